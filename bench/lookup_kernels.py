"""Torch path vs Triton kernels for the Engram lookup path: hash, gather (fwd+bwd), gate (fwd+bwd).

    python bench/lookup_kernels.py            # on a GPU: realistic sizes, speedups and the forward share
    python bench/lookup_kernels.py --small    # small sizes (what a CPU run uses)

On a GPU (sizes of the paper: B x T = 8 x 4096, d_mem 1280 = 2 orders x 8 heads x 80, hc_mult 4, a ~1B-parameter
backbone with Engram at two layers, bf16) it prints markdown tables of times, speedups, the Triton hash against
the numpy reference, and the share of a full forward spent in hash + gather. On a CPU the kernels only run in
Triton's interpreter (TRITON_INTERPRET=1, set here), so it checks correctness at small sizes and times nothing.
Results are recorded by hand in docs/benchmarks.md. (Not named bench/kernels.py: run from bench/, that file would
shadow the Hugging Face `kernels` library, which transformers probes with `import kernels`, for every script there.)
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is decorated

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "kernels"))  # this checkout's kernels/engram_kernels, unless one is installed
import engram_kernels  # noqa: E402

from modeling_engram import EngramConfig, EngramForCausalLM  # noqa: E402
from modeling_engram.kernel_dispatch import force_engram_kernel  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from reference_hashing import reference_hash  # noqa: E402

GPU_SIZES = dict(
    batch=8, length=4096, vocab_size=129280, hidden_size=2048, intermediate_size=5632, num_hidden_layers=12,
    num_attention_heads=16, hc_mult=4, engram_layer_ids=[1, 6], max_ngram_size=3, n_head_per_ngram=8,
    n_embed_per_ngram=640, engram_vocab_size=[282_800, 282_800], dtype=torch.bfloat16,
)
SMALL_SIZES = dict(
    batch=2, length=63, vocab_size=997, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, hc_mult=4, engram_layer_ids=[0, 1], max_ngram_size=3, n_head_per_ngram=8,
    n_embed_per_ngram=80, engram_vocab_size=[1009, 1013], dtype=torch.float32,
)


def build(sizes: dict, device: torch.device):
    config = EngramConfig(
        **{k: v for k, v in sizes.items() if k not in ("batch", "length", "dtype")},
        tie_word_embeddings=True, engram_pad_id=0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        max_position_embeddings=max(4096, sizes["length"]), attn_implementation="sdpa",
    )
    with torch.device(device):
        model = EngramForCausalLM(config).to(sizes["dtype"]).eval()
    input_ids = torch.randint(3, config.vocab_size, (sizes["batch"], sizes["length"]), device=device)
    return model, input_ids


def bench_ms(fn, warmup: int = 3, repeat: int = 10) -> float:
    """Median milliseconds of `fn()`: CUDA events around each call on a GPU, the wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if not torch.cuda.is_available():
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def lookup_ops(model, input_ids):
    """{op: (torch-path callable, Triton callable, check)} for hash, gather fwd+bwd and gate fwd+bwd."""
    inner = model.model
    hasher = inner.hasher
    layer = inner.layers[model.config.engram_layer_ids[0]].engram
    hash_ids = hasher(input_ids)[layer.layer_idx]
    branches = (model.config.hc_mult, model.config.hidden_size)
    dtype = layer.kv_proj.key_proj.weight.dtype
    generator = torch.Generator(device=input_ids.device).manual_seed(0)
    hidden = torch.randn(*input_ids.shape, *branches, device=input_ids.device, dtype=dtype, generator=generator)
    hidden.requires_grad_()
    rows = layer.table(hash_ids).detach().to(dtype)
    value, keys = (t.detach().requires_grad_() for t in layer.kv_proj(rows))
    key = keys.unflatten(-1, branches)  # a strided view into the fused projection, as in the model
    grad_rows = torch.randn_like(layer.table(hash_ids))
    grad_values = torch.randn_like(hidden)

    def with_kernel(kernel, fn):
        def run():
            with force_engram_kernel(kernel):
                return fn()
        return run

    def hash_all():
        return hasher(input_ids)

    def gather_fwd_bwd():
        layer.table.weight.grad = None
        layer.table(hash_ids).backward(grad_rows)
        return layer.table.weight.grad

    def gate_fwd_bwd():
        hidden.grad = keys.grad = value.grad = None
        layer.gated_values(hidden, key, value).backward(grad_values)
        return hidden.grad, keys.grad, value.grad

    return {
        "hash (all layers)": (with_kernel("torch", hash_all), with_kernel("triton", hash_all)),
        "gather fwd+bwd (1 layer)": (with_kernel("torch", gather_fwd_bwd), with_kernel("triton", gather_fwd_bwd)),
        "gate fwd+bwd (1 layer)": (with_kernel("torch", gate_fwd_bwd), with_kernel("triton", gate_fwd_bwd)),
    }


def max_relative_error(ours, reference) -> float:
    if isinstance(ours, dict):
        ours, reference = list(ours.values()), list(reference.values())
    if isinstance(ours, (list, tuple)):
        return max(max_relative_error(a, b) for a, b in zip(ours, reference))
    if not ours.dtype.is_floating_point:
        return 0.0 if torch.equal(ours, reference) else float("inf")
    return ((ours.float() - reference.float()).abs().max() / reference.float().abs().max().clamp_min(1e-30)).item()


def correctness(model, input_ids) -> None:
    print("| op | shape | torch vs Triton |\n|---|---|---|")
    for name, (torch_fn, triton_fn) in lookup_ops(model, input_ids).items():
        error = max_relative_error(triton_fn(), torch_fn())
        verdict = "bit-identical" if error == 0 else f"max rel. error {error:.2e}"
        print(f"| {name} | B x T = {input_ids.shape[0]} x {input_ids.shape[1]} | {verdict} |")
    with torch.no_grad():  # the last hidden state: full logits at 8 x 4096 x 129280 would take 8.5 GB each
        with force_engram_kernel("torch"):
            expected = model.model(input_ids, use_cache=False).last_hidden_state
        with force_engram_kernel("triton"):
            hidden = model.model(input_ids, use_cache=False).last_hidden_state
    print(f"| full forward (last hidden state) | same | max rel. error {max_relative_error(hidden, expected):.2e} |")


def numpy_hash_ms(model, input_ids) -> float:
    config, hasher = model.config, model.model.hasher
    compressed = hasher.token_map[input_ids].cpu().numpy()
    sizes = {l: torch.tensor(s).view(config.max_ngram_size - 1, -1).tolist()
             for l, s in zip(config.engram_layer_ids, config.engram_table_sizes)}
    multipliers = {l: torch.tensor(m).numpy() for l, m in zip(config.engram_layer_ids, config.engram_multipliers)}
    pad = int(hasher.token_map[config.engram_pad_id])
    started = time.perf_counter()
    reference_hash(compressed, config.engram_layer_ids, multipliers, sizes, config.max_ngram_size,
                   config.n_head_per_ngram, pad_id=pad)
    return (time.perf_counter() - started) * 1e3


def measure_speed(model, input_ids, warmup: int = 3, repeat: int = 10) -> dict:
    """Times (ms) of every lookup op on both paths, the numpy reference hash, and per path the forward and the share
    of it spent in hash + gather: `{"ops": {op: (torch, triton)}, "numpy_hash": ms, "forward": {path: (forward,
    lookup)}}`."""
    ops = {name: (bench_ms(torch_fn, warmup, repeat), bench_ms(triton_fn, warmup, repeat))
           for name, (torch_fn, triton_fn) in lookup_ops(model, input_ids).items()}
    inner, layers = model.model, model.config.engram_layer_ids
    forward = {}
    for kernel in ("torch", "triton"):
        with torch.no_grad(), force_engram_kernel(kernel):
            hash_ids = inner.hasher(input_ids)
            forward[kernel] = (
                bench_ms(lambda: model(input_ids, use_cache=False, logits_to_keep=1), warmup, repeat),
                bench_ms(lambda: [inner.layers[l].engram.table(ids) for l, ids in inner.hasher(input_ids).items()],
                         warmup, repeat),
            )
        assert set(hash_ids) == set(layers)
    return {"ops": ops, "numpy_hash": numpy_hash_ms(model, input_ids), "forward": forward}


def speed(model, input_ids) -> None:
    times = measure_speed(model, input_ids)
    print("| op | torch path (ms) | Triton (ms) | speedup |\n|---|---|---|---|")
    for name, (torch_ms, triton_ms) in times["ops"].items():
        print(f"| {name} | {torch_ms:.3f} | {triton_ms:.3f} | {torch_ms / triton_ms:.1f}x |")
    numpy_ms, triton_hash = times["numpy_hash"], times["ops"]["hash (all layers)"][1]
    print(f"\nnumpy reference hash (CPU, one run): {numpy_ms:.1f} ms; Triton hash {triton_hash:.3f} ms: "
          f"{numpy_ms / triton_hash:.0f}x (goal: >= 50x)")
    print("\n| path | forward (ms) | hash + gather (ms) | share |\n|---|---|---|---|")
    for kernel, (forward, lookup) in times["forward"].items():
        print(f"| {kernel} | {forward:.2f} | {lookup:.3f} | {lookup / forward:.2%} |")
    print("\nGoal: hash + gather under 2% of the forward time.")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="small sizes (the default without a GPU)")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    sizes = SMALL_SIZES if args.small or not gpu else GPU_SIZES
    device = torch.device("cuda" if gpu else "cpu")
    torch.manual_seed(0)
    model, input_ids = build(sizes, device)
    params = sum(p.numel() for n, p in model.named_parameters() if "engram.table" not in n)
    tables = sum(p.numel() for n, p in model.named_parameters() if "engram.table" in n)
    where = torch.cuda.get_device_name() if gpu else "CPU, Triton interpreter"
    print(f"{where}; backbone + gating {params / 1e6:.2f}M parameters, tables {tables / 1e6:.2f}M; "
          f"B x T = {input_ids.shape[0]} x {input_ids.shape[1]}, d_mem {model.config.engram_dim}, "
          f"hc_mult {model.config.hc_mult}, {sizes['dtype']}\n")
    correctness(model, input_ids)
    if gpu:
        print()
        speed(model, input_ids)
    else:
        print("\nNo GPU: correctness only (interpreter timings say nothing about GPU speed).")


if __name__ == "__main__":
    main()
