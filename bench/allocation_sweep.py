"""Toy-scale sparsity-allocation sweep (the Engram paper's Figure 3, left): validation loss against rho.

Every model has the same total and activated parameter budget (P_tot, P_act without the vocabulary embedding and
LM head, taken from the pure-MoE baseline rho = 1) and trains on the same tokens with the same steps, so compute
matches too up to the Engram layer's small dense part. `modeling_engram.allocation.allocate` turns each rho into a
number of routed experts and Engram rows per head table (paper eq. 7). Data: the Python standard library's own
source, split by file, with a byte-level BPE tokenizer trained on the train split (as in examples/main.py).

    python bench/allocation_sweep.py                    # default: a few minutes on a CPU (one thread)
    python bench/allocation_sweep.py --rhos 1,0.75,0.5 --steps 600 --seeds 0,1

Writes outputs/allocation_sweep.png and outputs/allocation_sweep.json; results are recorded in docs/benchmarks.md.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modeling_engram import EngramConfig, EngramForCausalLM, build_token_map
from modeling_engram.allocation import allocate, count_parameters
from modeling_engram.corpus import read_texts, stdlib_files, train_bpe_tokenizer
from modeling_engram.memory import EngramTable



def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts' token ids, each followed by eos, as one stream."""
    return torch.tensor([i for text in texts for i in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]])


def random_batches(stream: torch.Tensor, batch_size: int, seq_len: int, steps: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=generator)
        yield torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def validation_loss(model, stream: torch.Tensor, seq_len: int, max_chunks: int) -> float:
    model.eval()
    chunks = stream[: (len(stream) // seq_len) * seq_len].view(-1, seq_len)[:max_chunks]
    loss = model(chunks, labels=chunks).loss.item()
    model.train()
    return loss


def backbone(args, tokenizer, compressed: int) -> EngramConfig:
    """The shapes every rho shares; `n_routed_experts` is the rho = 1 baseline, Engram at layer 1."""
    return EngramConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=3 * args.expert_width,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, hc_mult=args.hc_mult,
        max_position_embeddings=args.seq_len, n_routed_experts=args.experts, n_shared_experts=1,
        num_experts_per_tok=2, moe_intermediate_size=args.expert_width, first_k_dense_replace=1,
        router_bias_update_speed=1e-3, engram_layer_ids=[1], max_ngram_size=3, n_head_per_ngram=4,
        n_embed_per_ngram=32, engram_vocab_size=[1000, 1000], engram_compressed_vocab_size=compressed,
        engram_pad_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def optimizer_for(model: EngramForCausalLM, lr: float) -> torch.optim.Optimizer:
    """AdamW; Engram tables get 5x the learning rate and no weight decay (paper section 4.1)."""
    tables = [p for m in model.modules() if isinstance(m, EngramTable) for p in m.parameters()]
    table_ids = {id(p) for p in tables}
    rest = [p for p in model.parameters() if id(p) not in table_ids]
    groups = [{"params": rest, "lr": lr, "weight_decay": 0.1}]
    if tables:
        groups.append({"params": tables, "lr": 5 * lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, betas=(0.9, 0.95))


def train_one(config, token_map, train_stream, val_stream, args, seed: int, label: str) -> float:
    torch.manual_seed(seed)
    model = EngramForCausalLM(config)
    model.set_token_map(token_map)
    optimizer = optimizer_for(model, args.lr)
    optimizer.register_step_post_hook(lambda *_: model.update_router_biases())
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=args.steps, pct_start=0.1
    )
    model.train()
    progress = tqdm(random_batches(train_stream, args.batch_size, args.seq_len, args.steps, seed),
                    total=args.steps, desc=label, leave=False)
    for batch in progress:
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.3f}")
    return validation_loss(model, val_stream, args.seq_len, max_chunks=args.val_chunks)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    rhos = sorted({r["rho"] for r in results})
    means = [sum(r["val_loss"] for r in results if r["rho"] == rho) / sum(r["rho"] == rho for r in results)
             for rho in rhos]
    axis.scatter([r["achieved_rho"] for r in results], [r["val_loss"] for r in results], s=14, alpha=0.5)
    axis.plot([next(r["achieved_rho"] for r in results if r["rho"] == rho) for rho in rhos], means, marker="o")
    axis.set_xlabel("allocation ratio rho (share of P_sparse in routed experts)")
    axis.set_ylabel("validation loss")
    axis.set_title("Sparsity allocation at toy scale (same parameter budget, same tokens)", fontsize=9)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=150)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rhos", default="1.0,0.8,0.6,0.4,0.2", help="comma-separated allocation ratios")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; each rho trains once per seed")
    parser.add_argument("--experts", type=int, default=32, help="routed experts of the rho = 1 baseline")
    parser.add_argument("--expert-width", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hc-mult", type=int, default=1, help="residual branches (mHC when > 1; slower on CPU)")
    parser.add_argument("--max-files", type=int, default=200)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--val-chunks", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; these tiny matmuls run fastest on one (and 2 threads on a busy 2-core box "
                             "measured 3-6x slower)")
    parser.add_argument("--out", type=Path, default=Path("outputs"))
    args = parser.parse_args()
    started = time.time()
    torch.set_num_threads(args.threads)
    rhos = [float(r) for r in args.rhos.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    train_files, val_files = stdlib_files(args.max_files, 0)
    train_texts, val_texts = read_texts(train_files), read_texts(val_files)
    tokenizer = train_bpe_tokenizer(train_texts, args.vocab_size)
    token_map, compressed = build_token_map(tokenizer)
    train_stream = token_stream(tokenizer, train_texts)
    val_stream = token_stream(tokenizer, val_texts)
    tokens = args.steps * args.batch_size * args.seq_len
    print(f"corpus: {len(train_files)} train / {len(val_files)} validation files, {len(train_stream):,} train tokens, "
          f"{len(tokenizer)} BPE tokens -> {compressed} compressed; each model trains on {tokens:,} tokens")

    shapes = backbone(args, tokenizer, compressed)
    baseline = count_parameters(shapes.with_changes(engram_layer_ids=[]))
    print(f"budget: P_tot {baseline.total_without_embeddings:,}, P_act {baseline.activated:,}, "
          f"P_sparse {baseline.sparse:,} (without the {baseline.embeddings:,} embedding and LM head parameters)")

    results = []
    for rho in rhos:
        allocation = allocate(shapes, baseline.total_without_embeddings, baseline.activated, rho)
        config = allocation.apply(shapes)
        counts = count_parameters(config)
        for seed in seeds:
            label = f"rho={rho:.2f} seed={seed}"
            loss = train_one(config, token_map, train_stream, val_stream, args, seed, label)
            results.append(dict(
                rho=rho, achieved_rho=allocation.achieved_rho, seed=seed, val_loss=loss,
                n_routed_experts=allocation.n_routed_experts, engram_rows_per_head=allocation.engram_rows_per_head,
                total_without_embeddings=counts.total_without_embeddings, activated=counts.activated,
            ))
            print(f"rho {rho:.2f} (achieved {allocation.achieved_rho:.3f}): {allocation.n_routed_experts} routed "
                  f"experts, {allocation.engram_rows_per_head:,} rows per head table, P_tot "
                  f"{counts.total_without_embeddings:,}, P_act {counts.activated:,}, seed {seed}: "
                  f"validation loss {loss:.4f} ({math.exp(loss):.2f} ppl)")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "allocation_sweep.json").write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()},
                                                                     results=results), indent=2))
    plot(results, args.out / "allocation_sweep.png")
    best = min(results, key=lambda r: r["val_loss"])
    print(f"best: rho {best['rho']:.2f} ({best['val_loss']:.4f}); wrote {args.out / 'allocation_sweep.png'} "
          f"in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
