"""The checks of bench/gpu_check.py, one section per process: `python bench/gpu_check_sections.py SECTION --part FILE`.

gpu_check.py starts each section in a fresh process, so a kernel that corrupts the CUDA context, runs out of memory or
hangs costs only its own section. Every check is written to FILE as soon as it is done, so a section stopped at its
deadline keeps what it measured. Sizes are in SIZES ("gpu": one H100/H200, 80 GB; "smoke": tiny, on the CPU, where
the kernels run in Triton's interpreter); thresholds are the arguments of each `record` call.
"""

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from tqdm.auto import tqdm

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import lookup_kernels  # noqa: E402  (before engram_kernels: sets TRITON_INTERPRET without a GPU, adds kernels/, tests/)
import offload  # noqa: E402
import train_step  # noqa: E402

import engram_kernels  # noqa: E402
from engram_kernels.gate import fused_gate_reference  # noqa: E402
from engram_kernels.gather import (  # noqa: E402
    gather_fp8_rows_reference,
    gather_rows_reference,
    row_gradients_reference,
)
from engram_kernels.hash import ngram_hash_reference  # noqa: E402
from reference_hashing import reference_hash  # noqa: E402  (tests/: the independent numpy demo contract)

from modeling_engram import EngramConfig, EngramForCausalLM, EngramHasher  # noqa: E402
from modeling_engram.configuration_engram import INT64_MAX  # noqa: E402
from modeling_engram.kernel_dispatch import force_engram_kernel  # noqa: E402
from modeling_engram.memory import EngramTable  # noqa: E402

# Largest |error| relative to the largest |reference| value: the kernel tests' tolerances (tests/kernels/kernel_checks).
TOLERANCE = {torch.float32: 5e-4, torch.bfloat16: 3e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# The paper's lookup path: B x T = 8 x 4096, orders 2-3 with 8 heads of 80 (d_mem 1280), 282,800 rows per head
# (2,262,400 per order), hc_mult 4 on a hidden-2048 backbone; FP8 rows in DeepSeek-V4.1's layout (orders 2-4, 8 heads
# of 256, one scale byte per 32 values), with 2^18 rows per head instead of 16M (the values do not depend on it).
SIZES = {
    "gpu": dict(
        kernels=dict(batch=8, length=4096, vocab_size=129_280, compressed_vocab_size=99_092, heads=8, rows=282_800,
                     head_dim=80, fp8_heads=24, fp8_rows=2**18, fp8_head_dim=256, branches=4, hidden=2048),
        models=dict(vocab_size=32_000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                    num_attention_heads=16, engram_layer_ids=[1, 3], n_head_per_ngram=8, n_embed_per_ngram=640,
                    engram_vocab_size=[100_000, 100_000], batch=4, length=128, new_tokens=64),
        # ~0.9B parameters (lookup_kernels.GPU_SIZES) with 4.1B table parameters (8.2 GB in bf16, 4.6x the backbone)
        placement=dict(lookup_kernels.GPU_SIZES, engram_vocab_size=[1_600_000, 1_600_000], batch=4, length=2048,
                       warmup=2, rounds=8),
        lookup=dict(lookup_kernels.GPU_SIZES, warmup=3, repeat=10),
        train=dict(rows=[100_000, 10_000_000], steps=20, warmup=3, batch_size=8, seq_len=128),
        fsdp=dict(rows=[10_000_000], steps=10, warmup=3, batch_size=8, seq_len=128),
    ),
    "smoke": dict(
        kernels=dict(batch=2, length=31, vocab_size=997, compressed_vocab_size=613, heads=8, rows=1009, head_dim=80,
                     fp8_heads=24, fp8_rows=61, fp8_head_dim=64, branches=4, hidden=64),
        models=dict(vocab_size=997, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    engram_layer_ids=[0, 1], n_head_per_ngram=8, n_embed_per_ngram=80,
                    engram_vocab_size=[1009, 1013], batch=2, length=9, new_tokens=4),
        placement=dict(lookup_kernels.SMALL_SIZES, engram_vocab_size=[2003, 2011], batch=2, length=32, warmup=1,
                       rounds=2),
        lookup=dict(lookup_kernels.SMALL_SIZES, warmup=0, repeat=1),
        train=dict(rows=[2_000, 200_000], steps=2, warmup=1, batch_size=2, seq_len=16),
        fsdp=dict(rows=[2_000], steps=2, warmup=1, batch_size=2, seq_len=16),
    ),
}


class Report:
    """The checks of one section, rewritten to `path` (JSON) after every change."""

    def __init__(self, section: str, path: Path, smoke: bool, deadline: float):
        self.section, self.path, self.smoke, self.deadline = section, path, smoke, deadline
        self.device = torch.device("cpu" if smoke else "cuda")
        self.checks: list[dict] = []
        self.started = time.perf_counter()
        self.environment = environment(self.device)
        self.save()

    def save(self) -> None:
        part = dict(section=self.section, environment=self.environment, checks=self.checks,
                    seconds=round(time.perf_counter() - self.started, 2))
        staged = self.path.with_suffix(".tmp")
        staged.write_text(json.dumps(part, indent=1))
        os.replace(staged, self.path)  # a section stopped mid-write leaves the previous whole file

    def record(self, check: str, value: float, *, at_most=None, at_least=None, equals=None, fmt="{:.3g}",
               speed: bool = False, note: str = "", seconds: float | None = None) -> None:
        """One row: `value` against its threshold. Speeds are not judged in the CPU smoke run (the interpreter)."""
        if at_most is not None:
            passed, threshold = value <= at_most, "<= " + fmt.format(at_most)
        elif at_least is not None:
            passed, threshold = value >= at_least, ">= " + fmt.format(at_least)
        elif equals is not None:
            passed, threshold = value == equals, "== " + fmt.format(equals)
        else:
            passed, threshold = None, ""
        if speed and self.smoke:
            passed, note = None, "; ".join(filter(None, [note, "CPU smoke: speed not judged"]))
        finite = isinstance(value, bool) or math.isfinite(value)  # the JSON stays standard: inf and NaN are null
        self.checks.append(dict(section=self.section, check=check, value=value if finite else None,
                                shown=fmt.format(value),
                                threshold=threshold, passed=None if passed is None else bool(passed), note=note,
                                seconds=seconds))
        self.save()

    def attempt(self, what: str, checks, *args) -> None:
        """`checks(*args)`, which records rows; an exception becomes a failed row (with its traceback) and the section
        goes on. Past the deadline it is skipped (a skipped row), so the section ends before it is stopped."""
        if time.time() > self.deadline:
            self.checks.append(dict(section=self.section, check=what, value=None, shown="skipped", threshold="",
                                    passed=None, skipped=True, note="the section's time budget was spent"))
            self.save()
            return
        started = time.perf_counter()
        try:
            checks(*args)
        except Exception as error:  # one failing check must not lose the rest of a GPU run
            self.checks.append(dict(section=self.section, check=what, value=None, shown="error", threshold="",
                                    passed=False, note=f"{type(error).__name__}: {error}"[:300],
                                    error=traceback.format_exc(), seconds=round(time.perf_counter() - started, 2)))
            self.save()
        finally:
            with contextlib.suppress(Exception):  # after a CUDA fault this raises too; later checks will record it
                free_memory(self.device)


def environment(device: torch.device) -> dict:
    import transformers
    import triton

    try:
        commit = subprocess.run(["git", "-C", str(BENCH), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:  # no git on the machine
        commit = ""
    return dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores",
        cuda=torch.version.cuda, torch=torch.__version__, triton=triton.__version__,
        transformers=transformers.__version__, interpreted=engram_kernels.INTERPRETED,
        commit=commit or None, python=platform.python_version(),
    )


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (inf on a shape mismatch)."""
    if actual.shape != expected.shape:
        return math.inf
    error = (actual.float() - expected.float()).abs().max().item()
    return error / max(expected.float().abs().max().item(), 1e-30)


def mismatches(actual: torch.Tensor, expected: torch.Tensor) -> int:
    """Elements that differ (bit for bit, NaN equal to NaN); every element on a shape mismatch."""
    if actual.shape != expected.shape:
        return max(actual.numel(), expected.numel())
    same = (actual == expected) | (actual.isnan() & expected.isnan() if actual.is_floating_point() else False)
    return int((~same).sum())


def model_sizes(sizes: dict) -> dict:
    """`sizes` without the run settings, for `lookup_kernels.build` (model fields, batch, length, dtype)."""
    return {k: v for k, v in sizes.items() if k not in ("warmup", "rounds", "repeat")}


def timed(device: torch.device):
    """Seconds since this call, read after the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()

    def seconds() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return round(time.perf_counter() - started, 3)

    return seconds


# ---- kernels against their references, compiled ----


def kernels_section(report: Report, sizes: dict) -> None:
    device = report.device
    if device.type == "cuda":
        report.record("Triton compiles the kernels (TRITON_INTERPRET unset)", not engram_kernels.INTERPRETED,
                      equals=True, fmt="{}")
    steps = [("hash", hash_checks)] + [(f"gather {name}", gather_checks) for name in DTYPES] + [
        ("gather fp8", fp8_checks)] + [(f"gate {name}", gate_checks) for name in DTYPES]
    for what, checks in tqdm(steps, desc="kernels"):
        report.attempt(what, checks, report, sizes, DTYPES.get(what.rsplit(" ", 1)[-1]))


def hash_case(sizes: dict, device: torch.device):
    """The paper's hash at two Engram layers (orders 2-3, 8 heads) with a random surjective token map, one multiplier
    at the largest value the config allows (int64 wrap-around), and a quarter of the positions masked."""
    config = EngramConfig(vocab_size=sizes["vocab_size"], num_hidden_layers=12, engram_layer_ids=[1, 6],
                          max_ngram_size=3, n_head_per_ngram=sizes["heads"],
                          engram_vocab_size=[sizes["rows"]] * 2,
                          engram_compressed_vocab_size=sizes["compressed_vocab_size"],
                          engram_pad_id=2, pad_token_id=0)
    generator = torch.Generator().manual_seed(0)
    compressed = config.engram_compressed_vocab_size
    merged = torch.randint(0, compressed, (config.vocab_size - compressed,), generator=generator)
    token_map = torch.cat([torch.arange(compressed), merged])[torch.randperm(config.vocab_size, generator=generator)]
    hasher = EngramHasher(config, token_map).to(device)
    multipliers = hasher.multiplier_tensor.clone()
    bound = INT64_MAX // compressed
    multipliers[0, 1] = bound if bound % 2 else bound - 1
    shape = (sizes["batch"], sizes["length"])
    ids = torch.randint(0, config.vocab_size, shape, generator=generator)
    mask = torch.rand(shape, generator=generator) > 0.25
    history = torch.randint(0, compressed, (shape[0], 2), generator=generator)
    dead = (torch.rand(config.vocab_size, generator=generator) < 0.05).to(torch.uint8)
    tensors = [t.to(device) for t in (ids, mask, history, dead)]
    return config, hasher, multipliers, *tensors


def hash_checks(report: Report, sizes: dict, _dtype) -> None:
    config, hasher, multipliers, ids, mask, history, dead = hash_case(sizes, report.device)
    token_map, table_sizes = hasher.token_map, hasher.table_size_tensor
    offsets = torch.cumsum(table_sizes, 1) - table_sizes
    common = dict(pad_id=config.engram_pad_id)
    variants = {
        "raw ids, mask, offsets": dict(ids=ids, token_mask=mask, offsets=offsets),
        "compressed ids, history (decoding)": dict(ids=token_map[ids], history=history, compressed=True),
        "raw ids, dead tokens (V4.1)": dict(ids=ids, dead=dead),
    }
    shape = f"B x T = {ids.shape[0]} x {ids.shape[1]}"
    for name, kwargs in variants.items():
        seconds = timed(report.device)
        ours = engram_kernels.ngram_hash(token_map=token_map, multipliers=multipliers, table_sizes=table_sizes,
                                         **common, **kwargs)
        expected = ngram_hash_reference(token_map=token_map, multipliers=multipliers, table_sizes=table_sizes,
                                        **common, **kwargs)
        report.record(f"hash: {name}, mismatching ids", mismatches(ours, expected), equals=0, fmt="{:,}",
                      note=shape, seconds=seconds())
    # The independent numpy reference of the demo's contract, on the compressed ids.
    ours = engram_kernels.ngram_hash(ids, token_map, multipliers, table_sizes, pad_id=config.engram_pad_id)
    pad = int(token_map[config.engram_pad_id])
    layers = config.engram_layer_ids
    numpy_multipliers = {layer: multipliers[i].cpu().numpy() for i, layer in enumerate(layers)}
    numpy_sizes = {layer: table_sizes[i].view(2, -1).tolist() for i, layer in enumerate(layers)}
    demo = reference_hash(token_map[ids].cpu().numpy(), layers, numpy_multipliers, numpy_sizes, 3,
                          config.n_head_per_ngram, pad_id=pad)
    expected = torch.stack([torch.from_numpy(demo[layer]) for layer in layers]).to(ours.device)
    report.record("hash: against the numpy demo reference, mismatching ids", mismatches(ours, expected), equals=0,
                  fmt="{:,}", note=shape)


def head_ids(sizes: dict, device: torch.device, heads: int, rows: int, generator: torch.Generator):
    """Head-local row ids [B, T, heads] in `heads` head tables of `rows` rows, and the heads' flat-table offsets."""
    offsets = torch.arange(heads, device=device) * rows
    return torch.randint(0, rows, (sizes["batch"], sizes["length"], heads), device=device, generator=generator), offsets


def gather_checks(report: Report, sizes: dict, dtype: torch.dtype) -> None:
    name = next(k for k, v in DTYPES.items() if v == dtype)
    device, heads, rows, head_dim = report.device, 2 * sizes["heads"], sizes["rows"], sizes["head_dim"]
    generator = torch.Generator(device).manual_seed(0)
    hash_ids, offsets = head_ids(sizes, device, heads, rows, generator)
    weight = torch.randn(heads * rows, head_dim, device=device, generator=generator).to(dtype)
    grad_rows = torch.randn(*hash_ids.shape[:2], heads * head_dim, device=device, generator=generator).to(dtype)
    note = f"{heads} heads x {rows:,} rows x {sizes['head_dim']}, B x T = {hash_ids.shape[0]} x {hash_ids.shape[1]}"
    weight.requires_grad_()
    seconds = timed(report.device)
    ours = engram_kernels.gather_rows(weight, hash_ids, offsets)
    expected = gather_rows_reference(weight, hash_ids, offsets)
    report.record(f"gather {name}: forward, mismatching values", mismatches(ours, expected), equals=0, fmt="{:,}",
                  note=note, seconds=seconds())
    seconds = timed(report.device)
    (grad,) = torch.autograd.grad(ours, weight, grad_rows)
    (expected_grad,) = torch.autograd.grad(expected, weight, grad_rows)
    report.record(f"gather {name}: backward (table gradient), rel. error", relative_error(grad, expected_grad),
                  at_most=TOLERANCE[dtype], fmt="{:.2e}", seconds=seconds())
    del grad, expected_grad
    unique, reference = row_gradients_reference(grad_rows, hash_ids, offsets)
    ordered = None
    for mode, deterministic in (("ordered", True), ("atomic", False)):
        seconds = timed(report.device)
        ours_unique, ours_grads = engram_kernels.row_gradients(grad_rows, hash_ids, offsets,
                                                               deterministic=deterministic)
        error = relative_error(ours_grads, reference) if torch.equal(ours_unique, unique) else math.inf
        report.record(f"gather {name}: row gradients ({mode}), rel. error", error, at_most=TOLERANCE[torch.float32],
                      fmt="{:.2e}", note="fp32 sums; inf if the rows differ", seconds=seconds())
        ordered = ours_grads if deterministic else ordered
    again = engram_kernels.row_gradients(grad_rows, hash_ids, offsets, deterministic=True)[1]
    report.record(f"gather {name}: ordered row gradients run to run, mismatching values", mismatches(again, ordered),
                  equals=0, fmt="{:,}")


def fp8_checks(report: Report, sizes: dict, _dtype) -> None:
    """Every e4m3 byte pattern and scale bytes around 2^0: bf16 rows bit for bit (inference only: no backward)."""
    heads, rows, head_dim = sizes["fp8_heads"], sizes["fp8_rows"], sizes["fp8_head_dim"]
    device = report.device
    generator = torch.Generator(device).manual_seed(1)
    hash_ids, offsets = head_ids(sizes, device, heads, rows, generator)
    values = torch.randint(0, 256, (heads * rows, head_dim), device=device, generator=generator, dtype=torch.uint8)
    scales = torch.randint(100, 155, (heads * rows, head_dim // 32), device=device, generator=generator,
                           dtype=torch.uint8)
    values = values.view(torch.float8_e4m3fn)
    seconds = timed(device)
    ours = engram_kernels.gather_fp8_rows(values, scales, hash_ids, offsets)
    expected = gather_fp8_rows_reference(values, scales, hash_ids, offsets)
    wrong = math.inf
    if ours.shape == expected.shape and ours.dtype == expected.dtype:  # bf16 bits; NaN patterns need only stay NaN
        nan = expected.isnan()
        wrong = int(((ours.isnan() != nan) | (~nan & (ours.view(torch.int16) != expected.view(torch.int16)))).sum())
    report.record("gather fp8 (V4.1 rows): forward, mismatching values", wrong, equals=0, fmt="{:,}", seconds=seconds(),
                  note=f"{heads} heads x {rows:,} rows x {head_dim}; inference only, no backward")


def gate_checks(report: Report, sizes: dict, dtype: torch.dtype) -> None:
    name = next(k for k, v in DTYPES.items() if v == dtype)
    device, branches, dim = report.device, sizes["branches"], sizes["hidden"]
    generator = torch.Generator(device).manual_seed(0)
    shape = (sizes["batch"], sizes["length"], branches, dim)
    query, key, grad = (torch.randn(shape, device=device, generator=generator) for _ in range(3))
    value = torch.randn(*shape[:2], dim, device=device, generator=generator)
    weights = [1 + 0.2 * torch.randn(branches, dim, device=device, generator=generator) for _ in range(2)]
    inputs = [t.to(dtype).requires_grad_() for t in (query, key, value, *weights)]
    grad = grad.to(dtype)
    del query, key, value
    note = f"B x T = {shape[0]} x {shape[1]}, M = {branches}, D = {dim}"
    seconds = timed(device)
    ours = engram_kernels.fused_gate(*inputs)
    expected = fused_gate_reference(*inputs)
    report.record(f"gate {name}: forward, rel. error", relative_error(ours, expected), at_most=TOLERANCE[dtype],
                  fmt="{:.2e}", note=note, seconds=seconds())
    seconds = timed(device)
    grads = torch.autograd.grad(ours, inputs, grad)
    expected_grads = torch.autograd.grad(expected, inputs, grad)
    errors = {n: relative_error(g, e) for n, g, e in zip(("query", "key", "value", "query_weight", "key_weight"),
                                                         grads, expected_grads)}
    worst = max(errors, key=errors.get)
    report.record(f"gate {name}: backward (5 gradients), largest rel. error", errors[worst], at_most=TOLERANCE[dtype],
                  fmt="{:.2e}", note=f"largest for {worst}", seconds=seconds())


# ---- whole models: kernels against the torch path ----


def models_section(report: Report, sizes: dict) -> None:
    combos = [(dtype, hc_mult, conv) for dtype in DTYPES for hc_mult in (1, 4) for conv in (True, False)]
    for dtype, hc_mult, conv in tqdm(combos, desc="models"):
        name = f"{dtype} hc{hc_mult} {'conv' if conv else 'no conv'}"
        report.attempt(f"model {name}", model_checks, report, sizes, name, DTYPES[dtype], hc_mult, conv)


def comparison_model(sizes: dict, dtype: torch.dtype, hc_mult: int, conv: bool, device: torch.device):
    """A random model whose Engram rows (std 1) and short conv (std 0.5) weigh in the output, so wrong rows show."""
    fields = {k: v for k, v in sizes.items() if k not in ("batch", "length", "new_tokens")}
    config = EngramConfig(**fields, hc_mult=hc_mult, engram_kernel_size=4 if conv else 0, max_ngram_size=3,
                          engram_pad_id=0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                          max_position_embeddings=512, attn_implementation="sdpa", tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = EngramForCausalLM(config).eval()
    with torch.no_grad():
        for layer_id in config.engram_layer_ids:
            engram = model.model.layers[layer_id].engram
            engram.table.weight.normal_(0, 1)
            if conv:
                engram.short_conv.weight.normal_(0, 0.5)
    return model.to(dtype)


def model_checks(report: Report, sizes: dict, name: str, dtype: torch.dtype, hc_mult: int, conv: bool) -> None:
    device = report.device
    model = comparison_model(sizes, dtype, hc_mult, conv, device)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, model.config.vocab_size, (sizes["batch"], sizes["length"]), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, : sizes["length"] // 4] = 0  # left padding: the mask reaches the hash kernel
    input_ids = input_ids.masked_fill(attention_mask == 0, 0).to(device)
    attention_mask = attention_mask.to(device)
    logits, generated = {}, {}
    seconds = timed(device)
    for kernel in ("torch", "triton"):
        with torch.no_grad(), force_engram_kernel(kernel):
            logits[kernel] = model(input_ids, attention_mask=attention_mask, use_cache=False).logits
    report.record(f"model {name}: logits, rel. error", relative_error(logits["triton"], logits["torch"]),
                  at_most=TOLERANCE[dtype], fmt="{:.2e}", seconds=seconds(),
                  note=f"B x T = {input_ids.shape[0]} x {input_ids.shape[1]}, row 0 left-padded")
    del logits
    seconds = timed(device)
    for kernel in ("torch", "triton"):
        with force_engram_kernel(kernel):
            generated[kernel] = model.generate(
                input_ids, attention_mask=attention_mask, max_new_tokens=sizes["new_tokens"],
                min_new_tokens=sizes["new_tokens"], do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                output_logits=True,
            )
    unexplained, note = greedy_divergence(generated["torch"], generated["triton"], input_ids.shape[1],
                                          TOLERANCE[dtype])
    report.record(f"model {name}: {sizes['new_tokens']} greedy tokens, rows diverging not at a near-tie", unexplained,
                  equals=0, fmt="{:,}", note=note, seconds=seconds())


def greedy_divergence(reference, ours, prompt_length: int, tolerance: float) -> tuple[int, str]:
    """(rows whose tokens first differ where the reference's two candidates are not within `tolerance` x max |logit|
    of each other, a note). A near-tie may flip either way within the dtype's tolerance; nothing else should."""
    expected, actual = reference.sequences[:, prompt_length:], ours.sequences[:, prompt_length:]
    if expected.shape != actual.shape:
        return expected.shape[0], f"lengths differ: {tuple(expected.shape)} vs {tuple(actual.shape)}"
    unexplained, notes = 0, []
    for row in range(expected.shape[0]):
        differ = (expected[row] != actual[row]).nonzero()
        if differ.numel() == 0:
            continue
        step = int(differ[0])
        step_logits = reference.logits[step][row].float()
        margin = (step_logits[expected[row, step]] - step_logits[actual[row, step]]).abs().item()
        scale = step_logits.abs().max().item()
        tie = margin <= tolerance * scale
        unexplained += not tie
        notes.append(f"row {row} from step {step} (margin {margin / scale:.1e} of max|logit|"
                     f"{', a near-tie' if tie else ''})")
    identical = expected.shape[0] - len(notes)
    return unexplained, f"{identical}/{expected.shape[0]} rows identical" + "".join("; " + n for n in notes)


# ---- placement throughput: resident, pinned host, disk ----


def with_prefetch(model, prefetch: bool):
    """`model`'s forward with `engram_prefetch` set first: one loaded host model serves both host rows."""

    def forward(*args, **kwargs):
        model.config.engram_prefetch = prefetch
        return model(*args, **kwargs)

    return forward


def placement_section(report: Report, sizes: dict) -> None:
    device, dtype = report.device, sizes["dtype"]
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-placement-"))
    try:
        report.attempt("placement", placement_checks, report, sizes, device, dtype, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def placement_checks(report: Report, sizes: dict, device: torch.device, dtype: torch.dtype, folder: Path) -> None:
    seconds = timed(device)
    resident, _ = lookup_kernels.build(model_sizes(sizes), device)
    tables = sum(t.weight.numel() for t in resident.modules() if isinstance(t, EngramTable))
    backbone = sum(p.numel() for p in resident.parameters()) - tables
    resident.save_pretrained(folder)
    load = dict(dtype=dtype, attn_implementation="sdpa")  # as the resident model
    host = EngramForCausalLM.from_pretrained(folder, engram_storage="host", **load).to(device).eval()
    disk = EngramForCausalLM.from_pretrained(folder, engram_storage="disk", **load).to(device).eval()
    report.record("model: table / backbone parameters", tables / backbone, fmt="{:.1f}x", seconds=seconds(),
                  note=f"backbone {backbone / 1e6:,.1f}M, tables {tables / 1e6:,.1f}M parameters ({dtype}); "
                       "seconds: build, save, load host and disk")
    host_tables = [t for t in host.modules() if isinstance(t, EngramTable)]
    if device.type == "cuda":
        report.record("host tables are pinned", all(t.weight.is_pinned() for t in host_tables), equals=True, fmt="{}")
    models = {
        "resident": resident,
        "host, prefetch": with_prefetch(host, True),
        "host, no prefetch": with_prefetch(host, False),
        "disk (page cache warm), prefetch": disk,
    }
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, resident.config.vocab_size, (sizes["batch"], sizes["length"]), generator=generator)
               for _ in range(sizes["warmup"] + sizes["rounds"])]
    first = batches[0].to(device)
    with torch.no_grad():
        expected = resident(first, use_cache=False, logits_to_keep=1).logits
        for name in ("host, prefetch", "disk (page cache warm), prefetch"):
            report.record(f"{name}: last logits vs resident, rel. error",
                          relative_error(models[name](first, use_cache=False, logits_to_keep=1).logits, expected),
                          at_most=TOLERANCE[dtype], fmt="{:.2e}")
    seconds = timed(device)
    times = offload.time_placements(models, batches, device, use_cache=False, logits_to_keep=1)
    tokens = sizes["batch"] * sizes["length"]
    rate = {name: tokens / statistics.median(t[sizes["warmup"]:]) for name, t in times.items()}
    report.record("resident: tokens/s", rate["resident"], fmt="{:,.0f}", seconds=seconds(),
                  note=f"B x T = {sizes['batch']} x {sizes['length']} random ids, forward, median of "
                       f"{sizes['rounds']}; lookups as engram_kernel='auto' dispatches them")
    for name in list(models)[1:]:
        goal = dict(at_least=0.99) if "no prefetch" not in name else {}  # without prefetch: what prefetch buys
        report.record(f"{name}: tokens/s / resident", rate[name] / rate["resident"], fmt="{:.3f}", speed=True,
                      note=f"{rate[name]:,.0f} tokens/s", **goal)


# ---- the lookup bench: hash and gather against the numpy demo and a forward ----


def lookup_section(report: Report, sizes: dict) -> None:
    report.attempt("lookup bench", lookup_checks, report, sizes)


def lookup_checks(report: Report, sizes: dict) -> None:
    seconds = timed(report.device)
    model, input_ids = lookup_kernels.build(model_sizes(sizes), report.device)
    times = lookup_kernels.measure_speed(model, input_ids, sizes["warmup"], sizes["repeat"])
    triton_hash = times["ops"]["hash (all layers)"][1]
    shape = f"B x T = {input_ids.shape[0]} x {input_ids.shape[1]}"
    report.record("lookup: Triton hash vs numpy demo hash, speedup", times["numpy_hash"] / triton_hash, at_least=50,
                  fmt="{:,.0f}x", speed=True, seconds=seconds(),
                  note=f"numpy {times['numpy_hash']:.1f} ms, Triton {triton_hash:.3f} ms, {shape}")
    for kernel, (forward, lookup) in times["forward"].items():
        goal = dict(at_most=0.02) if kernel == "triton" else {}  # the torch path's share: for comparison
        report.record(f"lookup: hash + gather / forward ({kernel})", lookup / forward, fmt="{:.2%}", speed=True,
                      note=f"{lookup:.3f} of {forward:.2f} ms", **goal)
    for op, (torch_ms, triton_ms) in times["ops"].items():
        report.record(f"lookup: {op}, Triton speedup over torch", torch_ms / triton_ms, fmt="{:.2f}x",
                      note=f"torch {torch_ms:.3f} ms, Triton {triton_ms:.3f} ms")


# ---- the sparse training step at 1e5 against 1e7 table rows ----


def train_section(report: Report, sizes: dict) -> None:
    for kernel in ("torch", "triton"):
        report.attempt(f"train step ({kernel})", train_checks, report, sizes, kernel)


def train_checks(report: Report, sizes: dict, kernel: str) -> None:
    small, large = sizes["rows"]
    seconds = timed(report.device)
    with force_engram_kernel(kernel):
        result = train_step.measure(True, [small, large], sizes["steps"], sizes["warmup"], sizes["batch_size"],
                                    sizes["seq_len"], device=report.device)
    low, high = result[small], result[large]
    report.record(f"train step ({kernel}): {high['rows']:,} vs {low['rows']:,} rows, step time ratio", high["paired"],
                  at_most=1.3, fmt="{:.2f}", speed=True, seconds=seconds(),
                  note=f"{low['total'] * 1e3:.1f} -> {high['total'] * 1e3:.1f} ms per step, median of paired steps; "
                       "create_engram_optimizer (sparse, lazy Adam)")
    report.record(f"train step ({kernel}): table optimizer state / table bytes",
                  high["state_bytes"] / high["table_bytes"], at_most=2.001, fmt="{:.3f}")


# ---- one rank of FSDP2 beside row-sharded tables (several ranks need several GPUs: NCCL) ----


def fsdp_section(report: Report, sizes: dict) -> None:
    report.attempt("fsdp2: one rank", fsdp_checks, report, sizes)


def fsdp_steps(report: Report, sizes: dict, policy: str | None) -> tuple[float, float]:
    """(loss after the last step, median step seconds) of bench/train_step.py's model at the larger table size: whole
    (policy None, no process group), or `shard_engram_model` with FSDP2 in "fp32" or "bf16" (fp32 reduce)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from modeling_engram import create_engram_optimizer, shard_engram_model
    from modeling_engram.sharded_training import clip_grad_norm_

    torch.manual_seed(0)
    model = EngramForCausalLM(train_step.config(sizes["rows"][-1])).to(report.device).train()
    if policy is not None:
        dtype = {"fp32": None, "bf16": torch.bfloat16}[policy]
        shard_engram_model(model, mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32))
    optimizer = create_engram_optimizer(model, lr=1e-3, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    times = []
    for index in range(sizes["warmup"] + sizes["steps"]):
        batch = torch.randint(3, 4096, (sizes["batch_size"], sizes["seq_len"]), generator=generator).to(report.device)
        seconds = timed(report.device)
        loss = model(batch, labels=batch).loss
        loss.backward()
        if policy is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        else:
            clip_grad_norm_(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= sizes["warmup"]:
            times.append(seconds())
    return loss.item(), statistics.median(times)


def fsdp_checks(report: Report, sizes: dict) -> None:
    import torch.distributed as dist

    rows = f"{sizes['rows'][-1]:,} table rows, {sizes['batch_size']} x {sizes['seq_len']} tokens"
    plain_loss, plain_seconds = fsdp_steps(report, sizes, None)  # before the process group: NCCL refuses whole
    report.record(f"fsdp2: whole model, one process: step ms ({rows})", plain_seconds * 1e3, speed=True,  # tables'
                  fmt="{:.1f}", note="sparse lazy Adam, no process group")  # sparse all-reduce
    with tempfile.TemporaryDirectory() as scratch:
        dist.init_process_group("nccl" if report.device.type == "cuda" else "gloo",
                                init_method=f"file://{scratch}/init", rank=0, world_size=1)
        try:
            for policy in ("fp32", "bf16"):
                loss, seconds = fsdp_steps(report, sizes, policy)
                report.record(f"fsdp2 ({policy}): one rank, tables sharded by rows: step ms ({rows})", seconds * 1e3,
                              speed=True, fmt="{:.1f}", note=f"{seconds / plain_seconds:.2f}x the whole model's step")
                report.record(f"fsdp2 ({policy}): loss after {sizes['warmup'] + sizes['steps']} steps, relative to "
                              "the whole model's", abs(loss - plain_loss) / abs(plain_loss),
                              at_most=1e-4 if policy == "fp32" else 2e-2, fmt="{:.2e}")
                free_memory(report.device)
        finally:
            dist.destroy_process_group()


SECTIONS = {"kernels": kernels_section, "models": models_section, "placement": placement_section,
            "lookup": lookup_section, "train": train_section, "fsdp": fsdp_section}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=list(SECTIONS))
    parser.add_argument("--part", type=Path, required=True, help="the JSON file this section's checks go to")
    parser.add_argument("--deadline", type=float, default=math.inf, help="time.time() after which no check starts")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (Triton's interpreter)")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; run with --smoke to check the script on the CPU")
    report = Report(args.section, args.part, args.smoke, args.deadline)
    torch.manual_seed(0)
    SECTIONS[args.section](report, SIZES["smoke" if args.smoke else "gpu"][args.section])
    report.save()


if __name__ == "__main__":
    main()
