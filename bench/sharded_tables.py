"""Row-sharded tables (table_parallel.py), alone and beside FSDP2, on gloo: per-rank bytes, peak RSS, step time and
table exchange volume.

    python bench/sharded_tables.py                         # ~1e5 and ~1e7 table rows, 1, 2 and 4 processes
    python bench/sharded_tables.py --rows 100000 --worlds 1,2 --steps 3     # a quick look
    python bench/sharded_tables.py --paths fsdp --hidden 512 --layers 8     # a backbone large enough to see

The model of bench/train_step.py (16 head tables over 2 Engram layers, rows 16 wide; `--hidden` and `--layers`
scale its backbone) is saved once per table size, then every configuration loads it in fresh processes, one CPU
thread each: the plain path (one process, whole tables), the sharded path (`from_pretrained(...,
engram_table_parallel=True)`) and the FSDP2 path (the same load, then `shard_engram_model`: `fully_shard` on the
backbone, the table shards left out) on each of `--worlds` gloo processes. Each process trains `--steps` timed steps
(after `--warmup`) of forward, backward, global gradient clipping and the lazy Adam step on its own batch of random
tokens (every n-gram nearly unique: the exchange's worst case). In the sharded path the backbone is not wrapped in
DDP: every rank holds all of it and its Adam state, which is the point of the comparison with FSDP2.

Reported per rank (the mean over ranks): bytes of the backbone (every parameter but the tables; FSDP2's local
shards) and of its optimizer state, of the table rows and of their optimizer state, peak RSS (VmHWM: `peak_rss`)
after loading and sharding (before the optimizer has state) and at the end, median step time, and the bytes sent
to other ranks per step by the table exchanges (`count_exchanged_bytes`; FSDP2's all-gathers and reduce-scatters
are not counted). Prints a markdown table for docs/benchmarks.md.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import config  # noqa: E402  (the model of the training-step bench)

from modeling_engram import EngramForCausalLM, create_engram_optimizer, table_optimizer_state_bytes  # noqa: E402
from modeling_engram.sharded_training import clip_grad_norm_, count_exchanged_bytes, shard_engram_model  # noqa: E402
from modeling_engram.training import backbone_optimizer_state_bytes, engram_tables  # noqa: E402

LABELS = {"plain": "plain", "sharded": "sharded tables", "fsdp": "FSDP2 + sharded tables"}


def peak_rss() -> int:
    """This process's peak resident bytes (VmHWM). Not `ru_maxrss`: a spawned process inherits its parent's peak in
    it (Linux carries it over the exec), and the parent here has built the whole model."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def worker(rank, world, path, folder, init_file, args, results):
    torch.set_num_threads(1)
    distributed = path != "plain"
    if distributed:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = EngramForCausalLM.from_pretrained(folder, engram_table_parallel=distributed).train()
    if path == "fsdp":
        shard_engram_model(model)
    with torch.no_grad():  # transformers leaves loaded tensors memory-mapped from the checkpoint: fault every table
        for table in engram_tables(model):  # page in now, as the sharded load does, so no step pays for it
            table.weight.mul_(1)
    optimizer = create_engram_optimizer(model, lr=1e-3, weight_decay=0.1)
    load_rss = peak_rss()
    generator = torch.Generator().manual_seed(rank)
    times, sent = [], []
    for index in range(args.warmup + args.steps):
        batch = torch.randint(1, model.config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
        if distributed:
            dist.barrier()  # every rank starts the step together: the time includes waiting for the slowest
        with count_exchanged_bytes() as exchanged:
            started = time.perf_counter()
            model(batch, labels=batch).loss.backward()
            if distributed:
                clip_grad_norm_(model, 1.0)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - started
        if index >= args.warmup:
            times.append(elapsed)
            sent.append(exchanged["sent"])
    table_state, table = table_optimizer_state_bytes(optimizer, model)
    backbone_state, backbone = backbone_optimizer_state_bytes(optimizer, model)
    results[rank] = dict(step=statistics.median(times), sent=statistics.median(sent), backbone=backbone,
                         backbone_state=backbone_state, table=table, table_state=table_state, load_rss=load_rss,
                         rss=peak_rss())
    if distributed:
        dist.destroy_process_group()


def measure(rows: int, world: int, path: str, folder: str, args) -> dict:
    results = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as scratch:
        mp.spawn(worker, args=(world, path, folder, os.path.join(scratch, "init"), args, results), nprocs=world)
    ranks = [results[rank] for rank in range(world)]
    mean = {key: statistics.mean(r[key] for r in ranks) for key in ranks[0]}
    return dict(rows=rows, world=world, path=path, **mean)


def row(run: dict, baseline: dict) -> str:
    """One markdown row; step time relative to `baseline` (the first run of this table size)."""
    processes = f"{run['world']} process{'es' if run['world'] > 1 else ''}"
    mib = [run[key] / 2**20 for key in ("backbone", "backbone_state", "table", "table_state", "load_rss", "rss")]
    return (f"| {run['rows']:,} | {LABELS[run['path']]}, {processes} | {mib[0]:,.1f} | {mib[1]:,.1f} | "
            f"{mib[2]:,.1f} | {mib[3]:,.1f} | {mib[4]:,.0f} / {mib[5]:,.0f} | "
            f"{run['step'] * 1e3:,.1f} ({run['step'] / baseline['step']:.2f}x) | {run['sent'] / 2**10:,.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="100000,10000000", help="total table rows (both Engram layers)")
    parser.add_argument("--paths", default="plain,sharded,fsdp", help="of plain, sharded, fsdp")
    parser.add_argument("--worlds", default="1,2,4", help="process counts of the sharded and fsdp paths")
    parser.add_argument("--hidden", type=int, default=128, help="backbone width (heads of 32, intermediate 3x)")
    parser.add_argument("--layers", type=int, default=4, help="backbone decoder layers (Engram at layers 1 and 2)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    paths = args.paths.split(",")
    if not set(paths) <= LABELS.keys():
        parser.error(f"--paths {args.paths!r}: each path is one of {', '.join(LABELS)}")
    worlds = [int(w) for w in args.worlds.split(",")]
    lines = []
    for rows in [int(r) for r in args.rows.split(",")]:
        model_config = config(rows).with_changes(
            hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 32, num_key_value_heads=args.hidden // 64)
        with tempfile.TemporaryDirectory() as folder:
            torch.manual_seed(0)
            model = EngramForCausalLM(model_config)
            stored_rows = sum(t.num_embeddings for t in engram_tables(model))
            model.save_pretrained(folder)
            del model
            baseline = None
            for path in paths:
                for world in [1] if path == "plain" else worlds:
                    run = measure(stored_rows, world, path, folder, args)
                    baseline = baseline or run
                    lines.append(row(run, baseline))
                    print(lines[-1], flush=True)
    print(f"\n| table rows | path | backbone MiB/rank | backbone Adam state MiB/rank | table MiB/rank | table Adam "
          f"state MiB/rank | peak RSS MiB/rank (load / end) | step ms (vs {LABELS[paths[0]]}) | table exchange KiB "
          f"sent to other ranks/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
