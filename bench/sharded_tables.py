"""Row-sharded tables (table_parallel.py) on gloo: per-rank bytes, peak RSS, step time and exchange volume.

    python bench/sharded_tables.py                         # ~1e5 and ~1e7 table rows, 1, 2 and 4 processes
    python bench/sharded_tables.py --rows 100000 --worlds 1,2 --steps 5     # a quick look

The model of bench/train_step.py (16 head tables over 2 Engram layers, rows 16 wide) is saved once per table size,
then every configuration loads it in fresh processes, one CPU thread each: the plain path (one process, whole
tables) and the sharded path (`from_pretrained(..., engram_table_parallel=True)`) on 1, 2 and 4 gloo processes.
Each process trains `--steps` timed steps (after `--warmup`) of forward, backward, global gradient clipping and
the lazy Adam step on its own batch of random tokens (every n-gram nearly unique: the exchange's worst case). The
dense rest is not wrapped in DDP here: its all-reduce is the same with or without sharded tables. Reported per rank
(the mean over ranks): table and optimizer-state bytes, peak RSS (`ru_maxrss`), median step time, and the bytes
sent to other ranks per step (`count_exchanged_bytes`). Prints a markdown table for docs/benchmarks.md.
"""

import argparse
import os
import resource
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
from modeling_engram.sharded_training import clip_grad_norm_, count_exchanged_bytes  # noqa: E402
from modeling_engram.training import engram_tables  # noqa: E402


def worker(rank, world, sharded, folder, init_file, args, results):
    torch.set_num_threads(1)
    if sharded:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = EngramForCausalLM.from_pretrained(folder, engram_table_parallel=sharded).train()
    with torch.no_grad():  # transformers leaves loaded tensors memory-mapped from the checkpoint: fault every table
        for table in engram_tables(model):  # page in now, as the sharded load does, so no step pays for it
            table.weight.mul_(1)
    optimizer = create_engram_optimizer(model, lr=1e-3, weight_decay=0.1)
    generator = torch.Generator().manual_seed(rank)
    times, sent = [], []
    for index in range(args.warmup + args.steps):
        batch = torch.randint(1, model.config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
        if sharded:
            dist.barrier()  # every rank starts the step together: the time includes waiting for the slowest
        with count_exchanged_bytes() as exchanged:
            started = time.perf_counter()
            model(batch, labels=batch).loss.backward()
            if sharded:
                clip_grad_norm_(model, 1.0)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - started
        if index >= args.warmup:
            times.append(elapsed)
            sent.append(exchanged["sent"])
    state, table = table_optimizer_state_bytes(optimizer, model)
    results[rank] = dict(step=statistics.median(times), sent=statistics.median(sent), table=table, state=state,
                         rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if sharded:
        dist.destroy_process_group()


def measure(rows: int, world: int, sharded: bool, folder: str, args) -> dict:
    results = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as scratch:
        mp.spawn(worker, args=(world, sharded, folder, os.path.join(scratch, "init"), args, results), nprocs=world)
    ranks = [results[rank] for rank in range(world)]
    mean = {key: statistics.mean(r[key] for r in ranks) for key in ranks[0]}
    return dict(rows=rows, world=world, sharded=sharded, **mean)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="100000,10000000", help="total table rows (both Engram layers)")
    parser.add_argument("--worlds", default="1,2,4", help="process counts of the sharded path")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    rows_list = [int(r) for r in args.rows.split(",")]
    lines = []
    for rows in rows_list:
        with tempfile.TemporaryDirectory() as folder:
            torch.manual_seed(0)
            model = EngramForCausalLM(config(rows))
            stored_rows = sum(t.num_embeddings for t in engram_tables(model))
            model.save_pretrained(folder)
            del model
            runs = [measure(stored_rows, 1, False, folder, args)]
            runs += [measure(stored_rows, world, True, folder, args) for world in worlds]
        plain = runs[0]
        for run in runs:
            label = f"sharded, {run['world']} process{'es' if run['world'] > 1 else ''}" if run["sharded"] else "plain"
            lines.append(
                f"| {run['rows']:,} | {label} | {run['table'] / 2**20:,.1f} | {run['state'] / 2**20:,.1f} | "
                f"{run['rss'] / 2**20:,.0f} | {run['step'] * 1e3:,.1f} ({run['step'] / plain['step']:.2f}x) | "
                f"{run['sent'] / 2**10:,.1f} |"
            )
            print(lines[-1], flush=True)
    print("\n| table rows | path | table MiB/rank | Adam state MiB/rank | peak RSS MiB/rank | step ms (vs plain) | "
          "KiB sent to other ranks/step |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
