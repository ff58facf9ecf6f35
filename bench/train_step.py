"""Training-step time and optimizer state vs table size: the same model with ~1e5 and ~1e7 table rows.

    python bench/train_step.py                 # ~20 s on 2 idle CPU cores, 4.2 GB peak
    python bench/train_step.py --steps 30      # the runs in docs/benchmarks.md
    OMP_NUM_THREADS=1 python bench/train_step.py --steps 30   # on a shared machine (no busy-waiting threads)

A step is forward + backward + gradient clipping + optimizer step + zero_grad, timed for both table sizes in
alternation within one run (so machine load hits both alike); the ratio of the median step times, and the median
of the ratios of adjacent steps (steadier when other jobs share the machine), is the cost of a 100x larger table. `create_engram_optimizer` (sparse table
gradients, lazy Adam) is measured against torch AdamW with dense table gradients (the naive baseline) in the same
run. Prints a markdown table for docs/benchmarks.md.
"""

import argparse
import gc
import statistics
import time

import torch

from modeling_engram import EngramConfig, EngramForCausalLM, create_engram_optimizer, table_optimizer_state_bytes
from modeling_engram.training import engram_parameter_groups, engram_tables

ORDERS, HEADS, LAYERS = 2, 4, 2  # per Engram layer: orders 2..3, 4 heads each; Engram at 2 layers: 16 head tables


def config(total_rows: int) -> EngramConfig:
    rows_per_head = total_rows // (ORDERS * HEADS * LAYERS)
    return EngramConfig(
        vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, engram_layer_ids=[1, 2], max_ngram_size=ORDERS + 1,
        n_head_per_ngram=HEADS, n_embed_per_ngram=64, engram_vocab_size=[rows_per_head] * ORDERS,
        pad_token_id=0, attn_implementation="sdpa",
    )


def build(total_rows: int, sparse: bool, lr: float = 1e-3, device: str | torch.device = "cpu"):
    torch.manual_seed(0)
    model = EngramForCausalLM(config(total_rows)).to(device).train()
    if sparse:
        optimizer = create_engram_optimizer(model, lr=lr, weight_decay=0.1)
    else:
        optimizer = torch.optim.AdamW(engram_parameter_groups(model, lr, 0.1), lr=lr)
    return model, optimizer


def step(model, optimizer, batch) -> tuple[float, float]:
    """(forward + backward seconds, clip + optimizer step + zero_grad seconds); on a GPU synchronised at each mark."""
    sync = torch.cuda.synchronize if batch.is_cuda else lambda: None
    sync()
    started = time.perf_counter()
    model(batch, labels=batch).loss.backward()
    sync()
    middle = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    return middle - started, time.perf_counter() - middle


def measure(sparse: bool, sizes: list[int], steps: int, warmup: int, batch_size: int, seq_len: int,
            device: str | torch.device = "cpu") -> dict:
    runs = {rows: build(rows, sparse, device=device) for rows in sizes}
    generator = torch.Generator().manual_seed(0)
    times = {rows: [] for rows in sizes}
    for index in range(warmup + steps):
        batch = torch.randint(3, 4096, (batch_size, seq_len), generator=generator).to(device)
        for rows in sizes:  # alternate, so both sizes see the same machine load
            forward_backward, update = step(*runs[rows], batch)
            if index >= warmup:
                times[rows].append((forward_backward, update))
    result = {}
    for rows, (model, optimizer) in runs.items():
        state, table = table_optimizer_state_bytes(optimizer, model)
        result[rows] = {
            "rows": sum(table.weight.shape[0] for table in engram_tables(model)),
            "forward_backward": statistics.median(t[0] for t in times[rows]),
            "update": statistics.median(t[1] for t in times[rows]),
            "total": statistics.median(sum(t) for t in times[rows]),
            # each step over the small table's step just before it: both saw about the same machine load
            "paired": statistics.median(sum(t) / sum(s) for t, s in zip(times[rows], times[sizes[0]])),
            "state_bytes": state,
            "table_bytes": table,
        }
    del runs
    gc.collect()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-rows", type=int, default=100_000)
    parser.add_argument("--large-rows", type=int, default=10_000_000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dense-steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    sizes = [args.small_rows, args.large_rows]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch_size} x {args.seq_len} "
          f"tokens; model {config(sizes[0]).hidden_size} hidden, 4 layers, Engram at 2 layers x {ORDERS * HEADS} "
          f"head tables, head_dim 16, fp32")
    print("| optimizer | table rows | fwd+bwd ms | clip+step ms | step ms | ratio to small table (of medians / "
          "median of paired steps) | table optimizer state / table bytes |")
    print("|---|---|---|---|---|---|---|")
    for name, sparse, steps in (("create_engram_optimizer (sparse, lazy Adam)", True, args.steps),
                                ("torch AdamW, dense table grads", False, args.dense_steps)):
        result = measure(sparse, sizes, steps, args.warmup, args.batch_size, args.seq_len)
        small = result[sizes[0]]
        for rows in sizes:
            r = result[rows]
            print(f"| {name} | {r['rows']:,} | {r['forward_backward'] * 1e3:.1f} | {r['update'] * 1e3:.1f} | "
                  f"{r['total'] * 1e3:.1f} | {r['total'] / small['total']:.2f} / {r['paired']:.2f} | "
                  f"{r['state_bytes'] / 2**20:,.1f} MiB / {r['table_bytes'] / 2**20:,.1f} MiB = "
                  f"{r['state_bytes'] / r['table_bytes']:.3f}x |")


if __name__ == "__main__":
    main()
