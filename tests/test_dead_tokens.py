"""Dead token ids (DeepSeek-V4.1's image placeholders): no n-gram reaches across one, and the gate there is 0."""

import pytest
import torch
from conftest import TINY_V41, decode_one_by_one, require, tiny_config, tiny_model

from modeling_engram.hashing import DEAD, EngramHasher
from modeling_engram.kernel_dispatch import force_engram_kernel

DEAD_IDS = [5, 6]


def hasher(**overrides):
    settings = dict(max_ngram_size=4, engram_vocab_size=[31, 37, 41], engram_dead_token_ids=DEAD_IDS)
    return EngramHasher(tiny_config(**{**settings, **overrides}))


def hash_layer(h, ids, mask=None):
    return h(torch.tensor(ids), None if mask is None else torch.tensor(mask))[0]


def test_a_dead_token_starts_the_n_grams_afresh():
    h = hasher()
    text = [[40, 41, 5, 42, 43, 44]]
    ids = hash_layer(h, text)
    after = hash_layer(h, [[42, 43, 44]])  # what follows the dead token hashes as a fresh sequence
    assert torch.equal(ids[:, 3:], after)
    assert torch.equal(ids[:, 2], hash_layer(h, [[2]])[:, 0])  # the dead position itself reads only pad ids
    assert torch.equal(ids[:, :2], hash_layer(h, [[40, 41]]))  # and what precedes it is untouched
    two_dead = hash_layer(h, [[40, 5, 6, 42]])
    assert torch.equal(two_dead[:, 3], after[:, 0])
    assert not torch.equal(hash_layer(hasher(engram_dead_token_ids=[]), text)[:, 3:], after)  # the rule matters


def test_padding_reads_the_pad_id_not_dead():
    h = hasher()
    ids = hash_layer(h, [[5, 40, 41]], mask=[[0, 1, 1]])  # a masked dead token is padding: nothing is cut
    assert torch.equal(ids, hash_layer(h, [[2, 40, 41]]))
    assert torch.equal(h.compress(torch.tensor([[5, 40]])), torch.tensor([[DEAD, 40]]))


@pytest.mark.parametrize("length", [1, 7, 63])
def test_triton_and_reference_hash_dead_tokens_like_torch(length):
    kernels = require("engram_kernels")
    h = hasher(vocab_size=97)
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(3, 9, (3, length), generator=generator)  # a third of them dead
    mask = (torch.rand(3, length, generator=generator) > 0.2).long()
    history = h.compress(torch.randint(3, 9, (3, 3), generator=generator))
    expected = h.hash_tokens(torch.cat([history, h.compress(ids, mask)], 1))
    args = (h.token_map, h.multiplier_tensor, h.table_size_tensor)
    for hash_fn in (kernels.hash.ngram_hash, kernels.hash.ngram_hash_reference):
        got = hash_fn(ids, *args, pad_id=h.pad_id, history=history, token_mask=mask, dead=h.dead_tokens)
        assert all(torch.equal(got[i], expected[layer]) for i, layer in enumerate(expected))
        fresh = hash_fn(ids, *args, pad_id=h.pad_id, dead=h.dead_tokens)
        assert all(torch.equal(fresh[i], h(ids)[layer]) for i, layer in enumerate(expected))
    torch_path = h.hash_tokens(torch.cat([h.start_history(ids), h.compress(ids, mask)], 1))
    with force_engram_kernel("triton"):  # the hasher's own dispatch: raw ids, mask and dead flags in one launch
        assert all(torch.equal(h(ids, mask)[layer], torch_path[layer]) for layer in expected)


def test_the_gate_is_zero_at_dead_tokens():
    model = tiny_model(hc_mult=4, **TINY_V41)
    ids = torch.tensor([[20, 3, 30, 40, 12, 50]])
    seen = {}
    layer = model.model.layers[0].engram
    handle = layer.register_forward_hook(lambda module, args, output: seen.setdefault("output", output))
    model(ids)
    handle.remove()
    dead = torch.tensor([False, True, False, False, True, False])
    assert seen["output"][0, dead].abs().max() == 0  # no short conv: the layer adds gate * value alone
    assert seen["output"][0, ~dead].abs().min(-1).values.gt(0).all()
    gates = {}  # with a short conv (and the unfactored path a gate hook forces) the gate itself is 0 there
    model = tiny_model(engram_dead_token_ids=TINY_V41["engram_dead_token_ids"])
    model.model.layers[0].engram.gate.register_forward_hook(lambda module, args, output: gates.setdefault("g", output))
    model(ids)
    assert gates["g"][0, dead].abs().max() == 0 and gates["g"][0, ~dead].min() > 0


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("conv", [0, 4])
def test_cached_decoding_with_dead_tokens_equals_the_full_forward(kernel, conv):
    if kernel == "triton":
        require("engram_kernels")
    model = tiny_model(hc_mult=4, engram_kernel_size=conv, engram_dead_token_ids=DEAD_IDS)
    ids = torch.tensor([[40, 41, 5, 42, 43, 6, 6, 44, 45, 46], [5, 47, 48, 49, 6, 50, 51, 52, 53, 5]])
    with force_engram_kernel(kernel), torch.no_grad():
        full = model(ids).logits
        steps, cache = decode_one_by_one(model, ids)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)
    history = cache.get_conv_state(0, 0)
    assert (history == DEAD).sum() == 1  # the cache's token history keeps the last dead token of row 2 as DEAD


def test_dead_token_ids_are_checked():
    with pytest.raises(ValueError, match=r"engram_dead_token_ids=\[5, 97\] is invalid; they must be distinct raw"):
        tiny_config(engram_dead_token_ids=[5, 97])
    with pytest.raises(ValueError, match=r"the pad id 2 \(what dead positions read\) cannot be dead"):
        tiny_config(engram_dead_token_ids=[2])
    assert tiny_config(engram_dead_token_ids=[9, 5]).engram_dead_token_ids == [5, 9]
