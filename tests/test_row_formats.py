"""Compact table rows: fp32 / bf16 / fp16 / FP8 e4m3 with ue8m0 scales per 32 values (DeepSeek-V4.1's layout)."""

import json

import pytest
import torch
from conftest import decode_one_by_one, require, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modeling_engram import EngramConfig, EngramForCausalLM, create_engram_optimizer, gating_peft_config
from modeling_engram.kernel_dispatch import force_engram_kernel
from modeling_engram.row_formats import (
    ROW_FORMATS, SCALE_BLOCK, dequantize_fp8, get_row_format, pack_rows, quantize_fp8, unpack_rows,
)
from modeling_engram.training import engram_tables as tables

WIDE = dict(n_embed_per_ngram=64)  # head_dim 32: one FP8 scale block per row
STORAGES = ["device", "host", "disk"]


def fp8_model(**overrides):
    model = tiny_model(**WIDE, **overrides)
    model.quantize_engram_tables("fp8_e4m3")
    return model


def test_every_e4m3_byte_dequantises_as_torch_decodes_it():
    bits = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).view(8, 32)
    scales = torch.tensor([[1], [60], [120], [126], [127], [128], [200], [254]], dtype=torch.uint8)
    rows = dequantize_fp8(bits, scales)
    expected = bits.float() * torch.exp2(scales.float() - 127)
    nan = expected.isnan()
    assert torch.equal(rows.isnan(), nan) and nan.sum() == 2  # 0x7f and 0xff
    assert torch.equal(rows[~nan], expected[~nan])
    # exact in bf16 (V4.1's bf16(float(e4m3) * 2**(byte - 127))) wherever the products are normal bf16 numbers
    normal = ~nan & (scales >= 60) & (scales <= 200)
    assert torch.equal(dequantize_fp8(bits, scales, torch.bfloat16).float()[normal], rows[normal])


def test_fp8_scales_are_the_smallest_powers_of_two_that_fit_448():
    torch.manual_seed(0)
    rows = torch.randn(200, 128) * torch.logspace(-20, 20, 200)[:, None]
    rows[3, :32] = 0.0  # an all-zero block
    rows[4, :32] = 448.0 * 2.0**5  # amax exactly 448 * 2**e
    values, scales = quantize_fp8(rows)
    assert values.dtype == torch.float8_e4m3fn and scales.dtype == torch.uint8 and scales.shape == (200, 4)
    exponent = scales.double() - 127
    amax = rows.double().unflatten(-1, (-1, SCALE_BLOCK)).abs().amax(-1)
    nonzero = amax > 0
    assert (amax / 2**exponent <= 448)[nonzero].all()
    assert (amax / 2 ** (exponent - 1) > 448)[nonzero].all()
    assert scales[3, 0] == 127 and scales[4, 0] == 127 + 5
    # error: half an e4m3 ulp of the value (3 mantissa bits), or of the block's subnormal step
    error = (dequantize_fp8(values, scales).double() - rows.double()).abs().unflatten(-1, (-1, SCALE_BLOCK))
    bound = torch.maximum(rows.double().abs().unflatten(-1, (-1, SCALE_BLOCK)) * 2**-4, 2 ** (exponent - 10)[..., None])
    assert (error <= bound).all()
    requantised = dequantize_fp8(*quantize_fp8(dequantize_fp8(values, scales)))
    assert torch.equal(requantised, dequantize_fp8(values, scales))  # quantising FP8 rows again changes no value


def test_packed_rows_round_trip():
    values, scales = quantize_fp8(torch.randn(5, 64))
    packed = pack_rows(values, scales)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 64 + 2)
    assert torch.equal(unpack_rows(packed, 64, torch.float32), dequantize_fp8(values, scales))


def test_bytes_per_row():
    assert {name: fmt.row_bytes(256) for name, fmt in ROW_FORMATS.items()} == {
        "fp32": 1024, "bf16": 512, "fp16": 512, "fp8_e4m3": 264,
    }


def test_bad_formats_are_refused_with_the_value():
    with pytest.raises(ValueError, match=r"engram_row_format='int4' is not a row format; choose one of"):
        tiny_model(**WIDE, engram_row_format="int4")
    with pytest.raises(ValueError, match=r"multiple of its scale block 32; the rows are 8 wide"):
        tiny_model(engram_row_format="fp8_e4m3")  # n_embed_per_ngram 16 over 2 heads
    with pytest.raises(ValueError, match=r"rows are 8 wide"):
        tiny_model().quantize_engram_tables("fp8_e4m3")
    with pytest.raises(ValueError, match=r"'fp4' is not a row format"):
        tiny_model(**WIDE).quantize_engram_tables("fp4")


@pytest.mark.parametrize("row_format", ["bf16", "fp16", "fp32", "fp8_e4m3"])
def test_a_row_format_holds_whatever_the_model_dtype(row_format):
    model = tiny_model(**WIDE, engram_row_format=row_format)
    dtype = ROW_FORMATS[row_format].dtype
    assert all(t.weight.dtype == dtype for t in tables(model))
    model.to(torch.float64)
    assert all(t.weight.dtype == dtype for t in tables(model)) and model.lm_head.weight.dtype == torch.float64
    assert (tables(model)[0].weight_scale is not None) == (row_format == "fp8_e4m3")
    model(torch.randint(3, 97, (2, 9)))


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = fp8_model()
    folder = tmp_path_factory.mktemp("fp8")
    model.save_pretrained(folder)
    return model, folder


def test_quantised_checkpoint_stores_values_and_scale_bytes(fp8_checkpoint):
    model, folder = fp8_checkpoint
    assert json.loads((folder / "config.json").read_text())["engram_row_format"] == "fp8_e4m3"
    with safe_open(folder / "model.safetensors", "pt") as f:
        kinds = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys() if ".table." in k}
    rows = sum(model.config.engram_table_sizes[0])
    assert kinds["model.layers.0.engram.table.weight"] == ("F8_E4M3", [rows, 32])
    assert kinds["model.layers.0.engram.table.weight_scale"] == ("U8", [rows, 1])


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("cache_rows", [0, 16])
def test_fp8_checkpoint_reloads_bit_identically_in_every_storage(fp8_checkpoint, storage, cache_rows):
    model, folder = fp8_checkpoint
    ids = torch.randint(3, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    expected = model(ids).logits
    loaded = EngramForCausalLM.from_pretrained(
        folder, engram_storage=storage, engram_cache_rows=cache_rows, attn_implementation="eager"
    )
    for table, original in zip(tables(loaded), tables(model)):
        assert table.storage.name == storage and table.weight.dtype == torch.float8_e4m3fn
        assert torch.equal(table.weight.view(torch.uint8), original.weight.view(torch.uint8))
        assert torch.equal(table.weight_scale, original.weight_scale)
    for _ in range(9):  # the hot-row cache fills (refresh every 8 fetches per table) and serves compact rows
        assert torch.equal(loaded(ids).logits, expected)
    if cache_rows:
        cache = tables(loaded)[0].cache
        assert cache.rows.dtype == torch.uint8 and cache.rows.shape[1] == 32 + 1  # value bytes + scale byte
        assert loaded.engram_cache_stats()[0]["hits"] > 0


@pytest.mark.parametrize("storage", STORAGES)
def test_gathers_move_only_the_compact_bytes(fp8_checkpoint, storage):
    _, folder = fp8_checkpoint
    loaded = EngramForCausalLM.from_pretrained(folder, engram_storage=storage)
    table = tables(loaded)[0]
    moved = []
    read = table.storage.read_unique
    table.storage.read_unique = lambda table, unique: moved.append(read(table, unique)) or moved[-1]
    loaded(torch.randint(3, 97, (1, 6)))
    if storage == "device":
        assert not moved  # device tables gather in place
        return
    rows = moved[0]
    assert rows.dtype == torch.uint8 and rows.shape[1] == ROW_FORMATS["fp8_e4m3"].row_bytes(32) == 33


def test_fp8_cached_generation_equals_the_full_forward(fp8_checkpoint):
    model, _ = fp8_checkpoint
    prompt = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8, use_cache=False)
    assert torch.equal(generated, uncached)
    steps, _ = decode_one_by_one(model, generated)
    torch.testing.assert_close(steps, model(generated).logits, rtol=1e-5, atol=1e-5)


def test_triton_fp8_gather_equals_the_torch_path(fp8_checkpoint):
    require("engram_kernels")
    model, _ = fp8_checkpoint
    ids = torch.randint(3, 97, (2, 7))
    hash_ids = model.model.hasher(ids)[0]
    table = tables(model)[0]
    torch_rows = table(hash_ids)
    with force_engram_kernel("triton"):
        triton_rows = table(hash_ids)
    assert triton_rows.dtype == torch.bfloat16 and torch.equal(triton_rows, torch_rows)


@pytest.mark.parametrize("source", ["fp32", "bf16"])
def test_quantising_a_trained_table_matches_quantize_fp8(source):
    model = tiny_model(**WIDE, engram_row_format=source)
    before = [t.weight.detach().float().clone() for t in tables(model)]
    model.quantize_engram_tables("fp8_e4m3")
    assert model.config.engram_row_format == "fp8_e4m3"
    for table, rows in zip(tables(model), before):
        values, scales = quantize_fp8(rows)
        assert torch.equal(table.weight.view(torch.uint8), values.view(torch.uint8))
        assert torch.equal(table.weight_scale, scales)
        assert not table.weight.requires_grad


def test_disk_tables_are_converted_before_saving(fp8_checkpoint):
    _, folder = fp8_checkpoint
    loaded = EngramForCausalLM.from_pretrained(folder, engram_storage="disk")
    with pytest.raises(ValueError, match="memory-mapped from its checkpoint"):
        loaded.quantize_engram_tables("bf16")


def test_fp8_tables_refuse_training_but_allow_gating_only_fine_tuning(fp8_checkpoint):
    model, _ = fp8_checkpoint
    with pytest.raises(ValueError, match=r"tables are fp8_e4m3 .* cannot be trained: train with fp32 or bf16 tables"):
        create_engram_optimizer(model)
    peft = require("peft")
    gated = peft.get_peft_model(fp8_model(), gating_peft_config(lora_r=2))
    optimizer = create_engram_optimizer(gated, lr=1e-2)
    ids = torch.randint(3, 97, (2, 9))
    gated(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def test_bf16_tables_train_sparsely_and_stay_bf16():
    model = tiny_model(**WIDE, engram_row_format="bf16").train()
    optimizer = create_engram_optimizer(model, lr=1e-2)
    table = tables(model)[0]
    before = table.weight.detach().clone()
    ids = torch.randint(3, 97, (2, 9))
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    rows = model.model.hasher(ids)[0] + table.offsets
    read = torch.zeros(table.num_embeddings, dtype=torch.bool)
    read[rows.flatten()] = True
    changed = (table.weight != before).any(-1)
    assert table.weight.dtype == torch.bfloat16 and losses[-1] < losses[0]
    assert changed[rows[:, :-1].flatten()].all()  # every row read before the last position (it has no label) moved
    assert not changed[~read].any()  # and no row that was not read


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("damage", ["scale rows", "no scales", "values cast"])
def test_a_checkpoint_whose_scales_do_not_match_is_refused(fp8_checkpoint, tmp_path, storage, damage):
    _, folder = fp8_checkpoint
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    tensors = load_file(tmp_path / "model.safetensors")
    key = "model.layers.2.engram.table.weight_scale"
    if damage == "scale rows":
        tensors[key] = tensors[key][:-1].contiguous()
        message = r"layers\.2\.engram\.table: scale tensor has shape \(\d+, 1\) .* need uint8 scales of shape"
    elif damage == "no scales":
        del tensors[key]
        message = r"layers\.2\.engram\.table: FP8 values \(\d+, 32\) come without their scale tensor"
    else:
        values = "model.layers.2.engram.table.weight"
        tensors[values] = tensors[values].float()
        message = r"layers\.2\.engram\.table\.weight is torch\.float32 with a weight_scale, but the config stores"
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=message):
        EngramForCausalLM.from_pretrained(tmp_path, engram_storage=storage)


def test_fp8_rows_in_a_config_without_a_row_format_are_refused(fp8_checkpoint, tmp_path):
    _, folder = fp8_checkpoint
    config = json.loads((folder / "config.json").read_text())
    config["engram_row_format"] = None
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"float8_e4m3fn with a weight_scale, but the config stores these rows as "
                                         r"the model's dtype"):
        EngramForCausalLM.from_pretrained(tmp_path)


def test_get_row_format():
    assert get_row_format(None) is None
    assert get_row_format("fp8_e4m3", 64).scaled and not get_row_format("bf16", 7).scaled
    assert EngramConfig(engram_row_format="bf16", **WIDE).engram_row_format == "bf16"
