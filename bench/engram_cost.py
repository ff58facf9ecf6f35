"""What the Engram layer costs against its FLOPs: the layer against its own key/value matmul, and model throughput
(prefill, cached decode, a training step) with Engram against the same model without it.

    OMP_NUM_THREADS=1 python bench/engram_cost.py                   # ~6 min on a 2-core machine, 5.5 GB peak
    OMP_NUM_THREADS=1 python bench/engram_cost.py --profile         # plus where the layer's time goes
    OMP_NUM_THREADS=1 python bench/engram_cost.py --compile         # plus the model ratios under torch.compile
    OMP_NUM_THREADS=1 python bench/engram_cost.py --sections layer  # one section: layer, model, train

One thread (torch.set_num_threads(1)); every ratio is the median over rounds in which the two contestants run back
to back, alternating which goes first, so machine load hits both alike (single runs vary by +-10% here).

- layer: an Engram layer (B 2 x T 512, hc_mult 4, hidden 1024, 2 orders x 8 heads x 64 = d_mem 1024, the demo's
  646,400-row head tables, conv weights drawn at random) forward under no_grad, against `rows @ [W_V; W_K]^T` with
  the weight concatenated once beforehand and the rows gathered beforehand: the matmul floor. Goal: <= 1.25x.
- model: hidden 768, 8 layers, Engram at layers 1 and 5 (d_mem 512), against the same config with
  `engram_layer_ids=[]`, for hc_mult 1 and 4. Prefill: B 2 x T 512 with a cache, one logit kept (as `generate`
  does). Decode: B 1, 64 cached greedy steps after a 64-token prompt. The FLOP ratio (no Engram / Engram, from
  `allocation.flops_per_token`; prefill without the LM head, which runs on one position) bounds the throughput
  ratio; goal: measured >= 0.97 x FLOP ratio.
- train: forward + backward + `create_engram_optimizer` step of the same models (B 2 x T 128), Engram / no Engram.
- formulations: the layer as it computed before this rewrite (`tests/test_engram_layer.py::reference_engram`)
  against the factored layer, in one run: the before/after ratio without two checkouts.

Prints markdown tables for docs/benchmarks.md.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from modeling_engram import EngramConfig, EngramForCausalLM, create_engram_optimizer
from modeling_engram.allocation import flops_per_token
from modeling_engram.engram_layer import EngramLayer, EngramShortConv
from modeling_engram.hashing import EngramHasher

LAYER_SHAPE = dict(batch=2, length=512, hidden_size=1024, hc_mult=4, n_embed_per_ngram=512, rows=646_400)
MODEL = dict(
    vocab_size=32768, hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
    num_key_value_heads=4, max_position_embeddings=2048, max_ngram_size=3, n_head_per_ngram=8,
    n_embed_per_ngram=256, engram_vocab_size=[100_000, 100_000], pad_token_id=0, engram_pad_id=0,
    attn_implementation="sdpa",
)
ENGRAM_LAYERS = [1, 5]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def paired(first, second, rounds: int, warmup: int = 1) -> tuple[float, float, float]:
    """(median seconds of `first`, of `second`, median of second / first per round), alternating the order."""
    for _ in range(warmup):
        first(), second()
    times_first, times_second, ratios = [], [], []
    for index in range(rounds):
        pair = {}
        for name, fn in ((("a", first), ("b", second)) if index % 2 == 0 else (("b", second), ("a", first))):
            started = time.perf_counter()
            fn()
            pair[name] = time.perf_counter() - started
        times_first.append(pair["a"])
        times_second.append(pair["b"])
        ratios.append(pair["b"] / pair["a"])
    return statistics.median(times_first), statistics.median(times_second), statistics.median(ratios)


def layer_setup():
    shape = LAYER_SHAPE
    config = EngramConfig(
        vocab_size=129280, hidden_size=shape["hidden_size"], num_hidden_layers=2, num_attention_heads=16,
        hc_mult=shape["hc_mult"], engram_layer_ids=[1], max_ngram_size=3, n_head_per_ngram=8,
        n_embed_per_ngram=shape["n_embed_per_ngram"], engram_vocab_size=[shape["rows"]] * 2, engram_kernel="torch",
    )
    torch.manual_seed(0)
    layer = EngramLayer(config, 1).eval()
    with torch.no_grad():
        layer.table.weight.uniform_(-0.05, 0.05)
        layer.short_conv.weight.normal_(0, 0.1)
    input_ids = torch.randint(3, config.vocab_size, (shape["batch"], shape["length"]))
    hash_ids = EngramHasher(config)(input_ids)[1]
    hidden = torch.randn(shape["batch"], shape["length"], shape["hc_mult"] * shape["hidden_size"])
    return config, layer, hash_ids, hidden


def bench_layer(rounds: int, profile: bool) -> None:
    config, layer, hash_ids, hidden = layer_setup()
    kv = layer.kv_proj
    with torch.no_grad():
        rows = layer.table(hash_ids)
        weight = torch.cat([kv.value_proj.weight, kv.key_proj.weight])  # concatenated once: the matmul alone

        def matmul():
            return F.linear(rows, weight)

        def forward():
            return layer(hidden, hash_ids)

        t_matmul, t_layer, ratio = paired(matmul, forward, rounds)
    tokens = hash_ids.shape[0] * hash_ids.shape[1]
    print(f"\n### Engram layer forward (B {hash_ids.shape[0]} x T {hash_ids.shape[1]}, hc_mult {config.hc_mult}, "
          f"hidden {config.hidden_size}, d_mem {config.engram_dim}, {layer.table.num_embeddings:,} table rows, "
          f"no_grad, {rounds} rounds)\n")
    print("| | ms | ratio to the kv matmul (median of paired rounds) |\n|---|---|---|")
    print(f"| kv matmul, rows [{tokens}, {config.engram_dim}] @ [{config.engram_dim}, {weight.shape[0]}] | "
          f"{t_matmul * 1e3:.1f} | 1.00 |")
    print(f"| Engram layer forward | {t_layer * 1e3:.1f} | **{ratio:.2f}** (goal <= 1.25) |")
    if profile:
        print_profile(layer, hidden, hash_ids, t_layer)


def print_profile(layer, hidden, hash_ids, t_layer: float) -> None:
    from torch.profiler import ProfilerActivity, profile

    calls = 3
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            layer(hidden, hash_ids)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\nProfile of the layer forward (torch.profiler, self CPU time per forward, {calls} forwards):\n")
    print("| op | calls per forward | self ms per forward | share |\n|---|---|---|---|")
    for event in events[:14]:
        print(f"| `{event.key}` | {event.count // calls} | {event.self_cpu_time_total / calls / 1e3:.1f} | "
              f"{event.self_cpu_time_total / total:.0%} |")


def model_config(hc_mult: int, engram: bool) -> EngramConfig:
    return EngramConfig(**MODEL, hc_mult=hc_mult, engram_layer_ids=ENGRAM_LAYERS if engram else [])


def build_pair(hc_mult: int) -> tuple[EngramForCausalLM, EngramForCausalLM]:
    """(Engram model, the same model without Engram), the second holding the first's backbone tensors themselves.

    Two separately allocated copies of one backbone differ by up to 10% in decode speed on this machine (where the
    weights land in memory matters to a memory-bound matvec), which would swamp the few percent measured here.
    """
    torch.manual_seed(0)
    engram = EngramForCausalLM(model_config(hc_mult, True)).eval()
    for module in engram.modules():  # conv weights start at zero; time them as a trained model runs them
        if isinstance(module, EngramShortConv):
            torch.nn.init.normal_(module.weight, 0, 0.1)
    base = EngramForCausalLM(model_config(hc_mult, False)).eval()
    shared = {name: tensor for name, tensor in engram.state_dict().items() if ".engram." not in name}
    base.load_state_dict(shared, assign=True)
    return engram, base


def flop_ratio(hc_mult: int, seq_len: int, lm_head: bool) -> float:
    """FLOPs per token without Engram / with Engram: the bound on the throughput ratio."""
    flops = []
    for engram in (False, True):
        config = model_config(hc_mult, engram)
        head = 0 if lm_head else 2 * config.vocab_size * config.hidden_size
        flops.append(flops_per_token(config, seq_len) - head)
    return flops[0] / flops[1]


def prefill_runner(model, input_ids):
    def run():
        with torch.no_grad():
            model(input_ids, use_cache=True, logits_to_keep=1)
    return run


def decode_runner(model, prompt, steps: int):
    def run():
        with torch.no_grad():
            out = model(prompt, use_cache=True, logits_to_keep=1)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
            started = time.perf_counter()
            for _ in range(steps):
                out = model(token, cache=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            run.decode_seconds = time.perf_counter() - started
    return run


def decode_paired(engram_run, base_run, rounds: int) -> tuple[float, float, float]:
    """Like `paired`, timing only the decode steps (the prompt's prefill is left out)."""
    engram_run(), base_run()
    pairs = []
    for index in range(rounds):
        for fn in ((engram_run, base_run) if index % 2 == 0 else (base_run, engram_run)):
            fn()
        pairs.append((engram_run.decode_seconds, base_run.decode_seconds))
    return (statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs),
            statistics.median(p[1] / p[0] for p in pairs))


def bench_models(rounds: int, compile_models: bool, hc_mults: list[int]) -> None:
    prefill_shape, prompt_len, steps = (2, 512), 64, 64
    generator = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(3, MODEL["vocab_size"], prefill_shape, generator=generator)
    prompt = torch.randint(3, MODEL["vocab_size"], (1, prompt_len), generator=generator)
    label = "torch.compile" if compile_models else "eager"
    print(f"\n### Model throughput, Engram / no Engram ({label}; hidden {MODEL['hidden_size']}, "
          f"{MODEL['num_hidden_layers']} layers, Engram at {ENGRAM_LAYERS}, d_mem "
          f"{model_config(1, True).engram_dim}; {rounds} rounds)\n")
    print("| hc_mult | phase | no Engram ms | Engram ms | throughput ratio (median of paired rounds) | FLOP ratio "
          "| ratio / FLOP ratio (goal >= 0.97) |\n|---|---|---|---|---|---|---|")
    for hc_mult in hc_mults:
        engram, base = build_pair(hc_mult)
        if compile_models:
            engram.forward, base.forward = torch.compile(engram.forward), torch.compile(base.forward)
        phases = {
            f"prefill {prefill_shape[0]} x {prefill_shape[1]}": (
                paired(prefill_runner(engram, prefill_ids), prefill_runner(base, prefill_ids), rounds),
                flop_ratio(hc_mult, prefill_shape[1], lm_head=False),
            ),
            f"decode {steps} steps (B 1)": (
                decode_paired(decode_runner(engram, prompt, steps), decode_runner(base, prompt, steps), rounds),
                flop_ratio(hc_mult, prompt_len + steps // 2, lm_head=True),
            ),
        }
        for phase, ((t_engram, t_base, ratio), flops) in phases.items():
            print(f"| {hc_mult} | {phase} | {t_base * 1e3:.1f} | {t_engram * 1e3:.1f} | {ratio:.3f} | {flops:.3f} | "
                  f"**{ratio / flops:.3f}** |")
        del engram, base


def train_runner(model, batch):
    optimizer = create_engram_optimizer(model, lr=1e-4)
    model.train()

    def run():
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return run


def bench_train(rounds: int, hc_mults: list[int]) -> None:
    batch = torch.randint(3, MODEL["vocab_size"], (2, 128), generator=torch.Generator().manual_seed(0))
    print(f"\n### Training step, Engram / no Engram (B 2 x T 128, forward + backward + create_engram_optimizer "
          f"step; {rounds} rounds)\n")
    print("| hc_mult | no Engram ms | Engram ms | time ratio Engram / no Engram | FLOP ratio (with / without) |\n"
          "|---|---|---|---|---|")
    for hc_mult in hc_mults:
        engram, base = build_pair(hc_mult)
        t_base, t_engram, ratio = paired(train_runner(base, batch), train_runner(engram, batch), rounds)
        print(f"| {hc_mult} | {t_base * 1e3:.1f} | {t_engram * 1e3:.1f} | {ratio:.3f} | "
              f"{1 / flop_ratio(hc_mult, 128, lm_head=True):.3f} |")
        del engram, base


def bench_formulations(rounds: int, hc_mults: list[int]) -> None:
    """The layer as it computed before (tests' `reference_engram`: one matmul over the weights concatenated per call,
    both norms materialised, F.conv1d) against the factored layer, in one run: forward without autograd at the layer
    shapes, forward + backward at the training shapes."""
    from test_engram_layer import reference_engram

    print(f"\n### Engram layer, module-by-module formulation (before) against the factored one (after), {rounds} "
          "rounds\n")
    print("| shapes | pass | before ms | after ms | after / before |\n|---|---|---|---|---|")
    config, layer, hash_ids, hidden = layer_setup()
    with torch.no_grad():
        rows = layer.table(hash_ids)
        t_before, t_after, ratio = paired(lambda: reference_engram(layer, hidden, rows),
                                          lambda: layer(hidden, hash_ids, rows=rows), rounds)
    print(f"| layer shapes (hc_mult {config.hc_mult}) | forward, no_grad | {t_before * 1e3:.1f} | "
          f"{t_after * 1e3:.1f} | {ratio:.3f} |")
    del layer, rows
    for hc_mult in hc_mults:
        engram, _ = build_pair(hc_mult)
        layer = engram.model.layers[ENGRAM_LAYERS[0]].engram.train()
        ids = torch.randint(3, MODEL["vocab_size"], (2, 128), generator=torch.Generator().manual_seed(0))
        hash_ids = engram.model.hasher(ids)[ENGRAM_LAYERS[0]]
        hidden = torch.randn(2, 128, hc_mult * MODEL["hidden_size"], requires_grad=True)
        rows = layer.table(hash_ids).detach().requires_grad_()

        def before():
            reference_engram(layer, hidden, rows).sum().backward()

        def after():
            layer(hidden, hash_ids, rows=rows).sum().backward()

        t_before, t_after, ratio = paired(before, after, rounds)
        print(f"| model shapes, B 2 x T 128, hc_mult {hc_mult} | forward + backward | {t_before * 1e3:.1f} | "
              f"{t_after * 1e3:.1f} | {ratio:.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="layer,model,train,formulations",
                        help="comma-separated: layer, model, train, formulations")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--profile", action="store_true", help="profile the layer forward")
    parser.add_argument("--compile", action="store_true", help="also the model ratios under torch.compile")
    parser.add_argument("--hc-mults", default="1,4", help="comma-separated hc_mult values of the model sections")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sections = args.sections.split(",")
    hc_mults = [int(v) for v in args.hc_mults.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, fp32")
    if "layer" in sections:
        bench_layer(args.rounds, args.profile)
    if "model" in sections:
        bench_models(args.rounds, compile_models=False, hc_mults=hc_mults)
        if args.compile:
            bench_models(args.rounds, compile_models=True, hc_mults=hc_mults)
    if "train" in sections:
        bench_train(max(3, args.rounds // 2), hc_mults)
    if "formulations" in sections:
        bench_formulations(args.rounds, hc_mults)


if __name__ == "__main__":
    main()
