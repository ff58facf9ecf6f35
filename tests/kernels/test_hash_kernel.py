"""The Triton n-gram hash against the torch reference, EngramHasher and the independent numpy reference: bit for bit."""

import numpy as np
import pytest
import torch
from conftest import tiny_config
from kernel_checks import DEVICE, LENGTHS, engram_kernels, mutant
from reference_hashing import reference_hash

from modeling_engram import EngramConfig, EngramHasher, build_token_map
from modeling_engram.configuration_engram import INT64_MAX
from modeling_engram.kernel_dispatch import force_engram_kernel

ngram_hash = engram_kernels.ngram_hash
ngram_hash_reference = engram_kernels.hash.ngram_hash_reference


def hash_case(length: int, batch: int = 2, seed: int = 0, vocab: int = 1000, compressed_vocab: int = 613):
    """Random ids, a surjective token map, multipliers up to the config's bound, prime sizes; 3 layers, N=4, 3 heads."""
    generator = torch.Generator().manual_seed(seed)
    merged = torch.randint(0, compressed_vocab, (vocab - compressed_vocab,), generator=generator)
    token_map = torch.cat([torch.arange(compressed_vocab), merged])
    token_map = token_map[torch.randperm(vocab, generator=generator)]
    bound = INT64_MAX // compressed_vocab
    multipliers = torch.randint(0, bound // 2, (3, 4), generator=generator) * 2 + 1
    multipliers[0, 1] = bound if bound % 2 else bound - 1  # the largest multiplier the config allows
    table_sizes = torch.tensor([[1009, 1013, 1019, 50021, 50023, 50033, 2000003, 2000029, 2000039]] * 3)
    table_sizes += torch.arange(3)[:, None] * 7
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    ids[0, -1] = int((token_map == compressed_vocab - 1).nonzero()[0])  # the largest compressed id
    mask = torch.rand(batch, length, generator=generator) > 0.3
    history = torch.randint(0, compressed_vocab, (batch, 3), generator=generator)
    return dict(ids=ids, token_map=token_map, multipliers=multipliers, table_sizes=table_sizes, mask=mask,
                history=history)


def to_device(case):
    return {name: value.to(DEVICE) for name, value in case.items()}


VARIANTS = {
    "raw": dict(),
    "raw-masked": dict(token_mask="mask"),
    "raw-history-offsets": dict(history="history", offsets=True),
    "compressed-history": dict(history="history", compressed=True),
}


def variant_kwargs(case, variant):
    spec = VARIANTS[variant]
    kwargs = dict(pad_id=2, compressed=spec.get("compressed", False))
    for name in ("token_mask", "history"):
        if name in spec:
            kwargs[name] = case[spec[name]]
    if spec.get("offsets"):
        kwargs["offsets"] = torch.cumsum(case["table_sizes"], 1) - case["table_sizes"]
    ids = case["token_map"][case["ids"]] if kwargs["compressed"] else case["ids"]
    return ids, kwargs


def check_hash(hash_fn, case, variant):
    ids, kwargs = variant_kwargs(case, variant)
    ours = hash_fn(ids, case["token_map"], case["multipliers"], case["table_sizes"], **kwargs)
    expected = ngram_hash_reference(ids, case["token_map"], case["multipliers"], case["table_sizes"], **kwargs)
    assert ours.dtype == torch.long and ours.shape == expected.shape
    assert torch.equal(ours, expected), f"{int((ours != expected).sum())} of {ours.numel()} hash ids differ"
    return ours


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("length", LENGTHS, ids=lambda n: f"T{n}")
def test_hash_is_bit_identical_to_the_torch_reference(length, variant):
    check_hash(ngram_hash, to_device(hash_case(length, seed=length)), variant)


@pytest.mark.parametrize("length", LENGTHS, ids=lambda n: f"T{n}")
def test_reference_agrees_with_the_independent_numpy_reference(length):
    case = hash_case(length, seed=length)
    ids, kwargs = variant_kwargs(case, "raw-masked")
    ours = ngram_hash(*(t.to(DEVICE) for t in (ids, case["token_map"], case["multipliers"], case["table_sizes"])),
                      pad_id=2, token_mask=kwargs["token_mask"].to(DEVICE)).cpu()
    lookup = case["token_map"].numpy()
    compressed = np.where(case["mask"].numpy(), lookup[ids.numpy()], lookup[2])
    layer_ids = [0, 1, 2]
    sizes = {layer: case["table_sizes"][layer].view(3, 3).tolist() for layer in layer_ids}
    multipliers = {layer: case["multipliers"][layer].numpy() for layer in layer_ids}
    expected = reference_hash(compressed, layer_ids, multipliers, sizes, 4, 3, pad_id=int(lookup[2]))
    for layer in layer_ids:
        np.testing.assert_array_equal(ours[layer].numpy(), expected[layer])


def raw_mixes(case) -> torch.Tensor:
    """Every product x'_{t-k} * m_k and XOR mix of the case (raw ids, pad history): [L, N, 2, B, T] int64."""
    tokens = torch.cat([case["token_map"][2].expand(case["ids"].shape[0], 3), case["token_map"][case["ids"]]], 1)
    length = case["ids"].shape[1]
    out = []
    for multipliers in case["multipliers"]:
        mix = torch.zeros_like(case["ids"])
        for k, multiplier in enumerate(multipliers):
            product = tokens[:, 3 - k : 3 - k + length] * multiplier
            mix = mix ^ product
            out.append(torch.stack([product, mix]))
    return torch.stack(out)


def test_operands_stay_non_negative_so_c_style_modulo_equals_floor():
    # x' <= V'-1 and m <= int64_max // V' (what EngramConfig enforces): every product and XOR mix is in [0, 2**63).
    case = hash_case(63)
    assert case["multipliers"].max() == INT64_MAX // 613 and (case["token_map"][case["ids"]] == 612).any()
    assert (612 * (INT64_MAX // 613)) < 2**63  # the largest product, computed in Python's exact integers
    assert (raw_mixes(case) >= 0).all()


def test_wrapped_products_still_match_torch_floor_modulo():
    # Outside the config's contract: multipliers up to 2**62 wrap int64 and make negative mixes. The kernel floors
    # like torch (C-style `%` alone would give negative rows), so even then it stays bit-identical.
    case = hash_case(500, seed=1)
    case["multipliers"] = torch.randint(2**61, 2**62, (3, 4), generator=torch.Generator().manual_seed(3)) | 1
    assert (raw_mixes(case) < 0).any()
    rows = check_hash(ngram_hash, to_device(case), "raw")
    assert (rows >= 0).all()


def test_int32_token_map_ids_and_bool_mask():
    case = hash_case(63, seed=5)
    expected = check_hash(ngram_hash, to_device(case), "raw-masked")
    case = to_device(case)
    ours = ngram_hash(case["ids"].int(), case["token_map"].int(), case["multipliers"], case["table_sizes"], pad_id=2,
                      token_mask=case["mask"].bool())
    assert torch.equal(ours, expected)


def test_strided_ids_history_and_mask_views():
    case = to_device(hash_case(63, seed=6))
    wide = torch.cat([case["history"], case["token_map"][case["ids"]]], dim=1)  # [B, N-1+T], as the model passes it
    ours = ngram_hash(wide[:, 3:], case["token_map"], case["multipliers"], case["table_sizes"], pad_id=2,
                      history=wide[:, :3], compressed=True)
    expected = ngram_hash_reference(wide[:, 3:].contiguous(), case["token_map"], case["multipliers"],
                                    case["table_sizes"], pad_id=2, history=wide[:, :3].contiguous(), compressed=True)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("length", [1, 63], ids=lambda n: f"T{n}")
def test_engram_hasher_dispatches_to_the_kernel_bit_identically(length):
    config = tiny_config(vocab_size=1000, engram_layer_ids=[0, 1, 2], max_ngram_size=4, n_head_per_ngram=3,
                         n_embed_per_ngram=24, engram_vocab_size=[1009, 50_000, 2_000_000])
    hasher = EngramHasher(config).to(DEVICE)
    ids = torch.randint(0, 1000, (3, length), generator=torch.Generator().manual_seed(length)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, : length // 2] = 0
    history = torch.randint(0, 1000, (3, 3 + length), device=DEVICE)
    with force_engram_kernel("torch"):
        expected = hasher(ids, mask), hasher.hash_tokens(history)
    with force_engram_kernel("triton"):
        ours = hasher(ids, mask), hasher.hash_tokens(history)
    for got, want in zip(ours, expected):
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_demo_contract_on_the_deepseek_v3_tokenizer(deepseek_v3_tokenizer):
    token_map, compressed = build_token_map(deepseek_v3_tokenizer)
    config = EngramConfig(vocab_size=128_815, num_hidden_layers=30, engram_layer_ids=[1, 15], max_ngram_size=3,
                          n_head_per_ngram=8, n_embed_per_ngram=512, engram_vocab_size=[129280 * 5] * 2,
                          engram_compressed_vocab_size=compressed)
    hasher = EngramHasher(config, token_map).to(DEVICE)
    text = ["Only Alexander the Great could tame the horse Bucephalus.", "Engram: conditional memory " * 20]
    batch = deepseek_v3_tokenizer(text, return_tensors="pt", padding="longest")["input_ids"]
    with force_engram_kernel("triton"):
        ours = hasher(batch.to(DEVICE))
    lookup = token_map.numpy()
    sizes = {layer: np.array(s).reshape(2, 8).tolist() for layer, s in zip([1, 15], config.engram_table_sizes)}
    multipliers = {layer: np.array(m) for layer, m in zip([1, 15], config.engram_multipliers)}
    expected = reference_hash(lookup[batch.numpy()], [1, 15], multipliers, sizes, 3, 8, pad_id=int(lookup[2]))
    for layer in (1, 15):
        np.testing.assert_array_equal(ours[layer].cpu().numpy(), expected[layer])


MUTATIONS = {
    "xor-as-or": ("mix = mix ^ product", "mix = mix | product"),
    "history-off-by-one": ("+ (N - 1) + pos,", "+ (N - 2) + pos,"),
    "c-style-modulo": ("rows = tl.where(rows < 0, rows + sizes[None, :], rows)", "rows = rows"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_deliberately_wrong_hash_kernel_fails_the_parity_check(mutation):
    wrong = mutant(engram_kernels.hash.kernel, *MUTATIONS[mutation])
    case = hash_case(63, seed=1)
    variant = "raw-history-offsets"
    if mutation == "c-style-modulo":  # only visible once mixes go negative (outside the config's contract)
        case["multipliers"] = torch.randint(2**61, 2**62, (3, 4), generator=torch.Generator().manual_seed(3)) | 1
    check_hash(ngram_hash, to_device(case), variant)
    with pytest.raises(AssertionError, match="hash ids differ"):
        check_hash(wrong.ngram_hash, to_device(case), variant)
