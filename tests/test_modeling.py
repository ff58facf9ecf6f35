"""Save/load, Auto classes, training-path equivalences, dtypes, compile and bad input on a tiny model."""

import json

import pytest
import torch
from conftest import BACKBONES, tiny_config, tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from modeling_engram import EngramConfig, EngramForCausalLM, EngramModel


def ids(batch=2, length=11, seed=0):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_auto_classes_are_registered():
    settings = {k: v for k, v in tiny_config().to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("engram", **settings)
    assert isinstance(config, EngramConfig)
    assert type(AutoModel.from_config(config)) is EngramModel
    assert type(AutoModelForCausalLM.from_config(config)) is EngramForCausalLM


@torch.no_grad()
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_and_reload_are_identical(tmp_path, tied):
    token_map = torch.arange(97) % 60  # a compression the reload must keep
    model = EngramForCausalLM(tiny_config(tie_word_embeddings=tied, hc_mult=4, engram_compressed_vocab_size=60))
    model.set_token_map(token_map)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["engram_multipliers"] == model.config.engram_multipliers
    assert stored["engram_table_sizes"] == model.config.engram_table_sizes

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model.eval()
    batch = ids()
    assert torch.equal(reloaded(batch).logits, model(batch).logits)
    assert torch.equal(reloaded.model.hasher.token_map, token_map)
    for layer_id, hashed in model.model.hasher(batch).items():
        assert torch.equal(reloaded.model.hasher(batch)[layer_id], hashed)
    assert (reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()) == tied


def test_saved_hash_constants_are_not_recomputed(tmp_path, monkeypatch):
    """The multipliers come from config.json, not from numpy, once a model exists."""
    tiny_model().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["engram_multipliers"]
    import numpy as np

    def broken_rng(*args, **kwargs):
        raise AssertionError("numpy RNG called on load")

    monkeypatch.setattr(np.random, "default_rng", broken_rng)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.engram_multipliers == saved
    assert reloaded.model.hasher.multiplier_tensor.tolist() == saved


@pytest.mark.parametrize("backbone", ["hc4", "hc4-moe"])
def test_gradient_checkpointing_gives_the_same_gradients(backbone):
    batch = ids()
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(**BACKBONES[backbone]).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        loss = model(batch, labels=batch).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any("engram.table" in name for name in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_labels_give_the_shifted_loss_and_ignore_minus_100():
    model = tiny_model()
    batch = ids()
    labels = batch.clone()
    labels[:, :4] = -100
    out = model(batch, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 97)
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_num_items_in_batch_sums_the_loss_over_the_stated_token_count():
    """Trainer's gradient accumulation passes the token count of all micro-batches; the loss is summed over it."""
    model, batch = tiny_model(), ids()
    logits = model(batch).logits[:, :-1].reshape(-1, 97)
    total = torch.nn.functional.cross_entropy(logits, batch[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(model(batch, labels=batch, num_items_in_batch=torch.tensor(50)).loss, total / 50)


@torch.no_grad()
@pytest.mark.parametrize("keyword, value, message", [
    ("head_mask", torch.ones(3, 4), "head_mask is not supported: transformers 5 removed head masking"),
    ("encoder_hidden_states", torch.zeros(2, 11, 32), "encoder_hidden_states is not supported: a decoder-only"),
    ("cache_position", torch.arange(1, 12), r"cache_position \[1, .*\] disagrees with the cache, which holds 0"),
])
def test_keywords_that_kwargs_would_swallow_are_refused_by_name(keyword, value, message):
    """Audit of `**kwargs`: each keyword that would change the meaning of a call is honoured (past_key_values,
    seq_idx, cu_seq_lens_*, output_router_logits, num_items_in_batch: tested where they act) or refused here,
    in forward and in generate."""
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        model(ids(), **{keyword: value})
    if keyword != "cache_position":  # generate's own check of unused model_kwargs, or ours
        with pytest.raises(ValueError, match=keyword):
            model.generate(ids(), max_new_tokens=2, **{keyword: value})


@torch.no_grad()
def test_a_cache_position_that_states_what_the_cache_implies_is_accepted():
    model, batch = tiny_model(), ids()
    out = model(batch[:, :6], cache_position=torch.arange(6), use_cache=True)
    step = model(batch[:, 6:], cache=out.cache, cache_position=torch.arange(6, 11))
    torch.testing.assert_close(step.logits, model(batch).logits[:, 6:], atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("backbone", ["hc1", "hc4-moe"])
def test_bf16_forward_runs_and_stays_close(backbone):
    model = tiny_model(**BACKBONES[backbone])
    batch = ids()
    reference = model(batch).logits
    logits = model.to(torch.bfloat16)(batch).logits
    assert logits.dtype == torch.bfloat16
    assert model.model.hasher.token_map.dtype == torch.long  # integer buffers are never cast
    torch.testing.assert_close(logits.float(), reference, atol=0.1, rtol=0.05)


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize("backbone", ["hc1", "hc4-moe"])
def test_torch_compile_of_the_forward_runs_as_one_graph(backbone):
    model = tiny_model(**BACKBONES[backbone])
    batch = ids()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # no graph break
    torch.testing.assert_close(compiled(batch).logits, model(batch).logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_sdpa_equals_eager():
    eager = tiny_model(attn_implementation="eager")
    sdpa = tiny_model(attn_implementation="sdpa")
    batch = ids()
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    real = mask.bool()  # fully masked (padding) rows are undefined and differ between kernels
    torch.testing.assert_close(sdpa(batch, attention_mask=mask).logits[real],
                               eager(batch, attention_mask=mask).logits[real], atol=1e-5, rtol=1e-5)


def test_fresh_conv_is_zero_so_engram_adds_only_gated_values():
    model = tiny_model(conv_nonzero=False)
    for layer_id in model.config.engram_layer_ids:
        assert torch.count_nonzero(model.model.layers[layer_id].engram.short_conv.weight) == 0


@pytest.mark.parametrize("bad", [97, 1000, -1])
def test_out_of_range_token_ids_are_named(bad):
    model = tiny_model()
    batch = ids()
    batch[1, 5] = bad
    with pytest.raises(ValueError, match=rf"token id {bad}, outside the vocabulary \[0, 96\] \(vocab_size=97\)"):
        model(batch)


def test_labels_may_hold_minus_100_but_ids_may_not():
    model = tiny_model()
    batch = ids()
    out = model(batch, labels=torch.full_like(batch, -100).index_fill(1, torch.tensor([3]), 5))
    # One target per row (token 5 at position 3, predicted from position 2): the loss is that prediction's alone.
    expected = torch.nn.functional.cross_entropy(out.logits[:, 2], torch.tensor([5, 5]))
    torch.testing.assert_close(out.loss, expected)
    masked_ids = batch.clone()
    masked_ids[0, 3] = -100  # labels copied into input_ids by a faulty collator
    with pytest.raises(ValueError, match=r"token id -100, outside the vocabulary"):
        model(masked_ids)


def test_empty_sequence_is_a_clear_error():
    with pytest.raises(ValueError, match="non-empty"):
        tiny_model()(torch.zeros((2, 0), dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_token_ids_of_a_non_integer_dtype_are_a_clear_error(dtype):
    with pytest.raises(ValueError, match=f"input_ids has dtype {dtype}; token ids must be integers"):
        tiny_model()(ids().to(dtype))


def test_inputs_embeds_alone_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=torch.zeros(1, 3, 32))


def test_unset_token_map_is_a_clear_error():
    model = EngramForCausalLM(tiny_config(engram_compressed_vocab_size=50))
    with pytest.raises(ValueError, match="token map is unset"):
        model(ids())


@pytest.mark.parametrize(
    "token_map, message",
    [
        (torch.arange(96) % 50, r"shape \(96,\).*needs .* shape \(97,\)"),
        (torch.arange(97) % 40, "40 distinct compressed ids.*engram_compressed_vocab_size=50"),
        (torch.arange(97) % 60, "60 distinct compressed ids"),
    ],
)
def test_mismatched_token_map_is_refused(token_map, message):
    model = EngramForCausalLM(tiny_config(engram_compressed_vocab_size=50))
    with pytest.raises(ValueError, match=message):
        model.set_token_map(token_map)


def test_checkpoint_whose_token_map_disagrees_refuses_to_load(tmp_path):
    model = EngramForCausalLM(tiny_config(engram_compressed_vocab_size=50))
    model.set_token_map(torch.arange(97) % 50)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.hasher.token_map"] = torch.arange(97) % 45
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not match its config: token map has 45 distinct"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_checkpoint_whose_table_sizes_disagree_refuses_to_load(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["engram_vocab_size"] = [41, 37]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"engram_table_sizes .* disagree with the sizes derived from engram_vocab_size=\[41, 37\]"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_checkpoint_whose_table_shapes_disagree_refuses_to_load(tmp_path, caplog):
    """transformers' own load report names the table and both shapes, then loading stops."""
    tiny_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    name = "model.layers.2.engram.table.weight"
    weights[name] = weights[name][:-3].contiguous()
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "model.layers.2.engram.table.weight | MISMATCH" in caplog.text
    assert "ckpt: torch.Size([217, 8]) vs model:torch.Size([220, 8])" in caplog.text


def hashes_equal(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@torch.no_grad()
@pytest.mark.parametrize("backbone", ["hc1", "hc4-v41"])
def test_resized_models_hash_kept_ids_bit_for_bit_give_new_ids_their_own_and_reload(tmp_path, backbone):
    model = tiny_model(engram_compressed_vocab_size=60, **BACKBONES[backbone])
    model.set_token_map(torch.arange(97) % 60)
    batch, short = ids(), ids().clamp_max(89)
    hashes, short_hashes, logits = model.model.hasher(batch, None), model.model.hasher(short, None), model(batch).logits
    embeddings = model.resize_token_embeddings(101)
    assert embeddings.num_embeddings == 101 and model.config.vocab_size == 101
    assert model.config.engram_compressed_vocab_size == 64
    assert model.model.hasher.token_map[97:].tolist() == [60, 61, 62, 63]
    assert hashes_equal(model.model.hasher(batch, None), hashes)
    torch.testing.assert_close(model(batch).logits[..., :97], logits, atol=1e-6, rtol=0)
    with_new = batch.clone()
    with_new[:, -2:] = torch.tensor([97, 100])
    expected = model(with_new).logits
    model.save_pretrained(tmp_path)
    reloaded = EngramForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.equal(reloaded(with_new).logits, expected)
    model.resize_token_embeddings(90)  # kept ids 0-89 still use every compressed id (n % 60)
    assert model.config.engram_compressed_vocab_size == 60 and model.model.hasher.token_map.shape == (90,)
    assert hashes_equal(model.model.hasher(short, None), short_hashes)


def test_a_resize_that_cannot_hash_exactly_is_refused_before_anything_changes():
    model = tiny_model(engram_compressed_vocab_size=60)
    model.set_token_map(torch.arange(97) % 60)
    limit = torch.iinfo(torch.long).max // 60
    model.model.hasher.multipliers[0][0] = limit - (limit % 2 == 0)  # the largest odd multiplier V' = 60 allows
    with pytest.raises(ValueError, match="would overflow int64.*rebuild the token map"):
        model.resize_token_embeddings(98)
    assert model.get_input_embeddings().num_embeddings == 97 and model.config.vocab_size == 97
    with pytest.raises(ValueError, match=r"drops dead token ids \[12\]"):
        tiny_model(engram_dead_token_ids=[5, 12]).resize_token_embeddings(12)
    gaps = tiny_model(engram_compressed_vocab_size=60)  # ids 0-19 map to compressed 0-9 and 20-29
    order = torch.cat([torch.arange(10), torch.arange(20, 30), torch.arange(10, 20), torch.arange(30, 60)])
    gaps.set_token_map(torch.cat([order, torch.arange(37)]))
    with pytest.raises(ValueError, match="leaves compressed ids unused"):
        gaps.resize_token_embeddings(20)
