"""The main job: Engram against a DeepSeekMoE of the same size and compute, and a dense twin, on real text.

Default data: the Python standard library's own source files (present on every machine), split by file into
train and validation, read through `datasets`; a byte-level BPE tokenizer is trained on the train split and its
Engram token map built. Three models train on the same tokens in the same order with the same schedule and the
paper's optimizer recipe:

- MoE: a small decoder whose FFNs after the first are DeepSeekMoE layers (one shared expert, top-k of the routed
  experts, auxiliary-loss-free balancing);
- Engram: the same decoder with the same total and activated parameters, where `allocation.allocate` moves
  1 - rho of the MoE's sparse budget (the routed experts a token does not use) into Engram tables at layer 1
  (the paper's sparsity allocation, eq. 7; rho = 0.8 lies in its good range);
- dense: the decoder without experts or Engram, its MLPs widened until its FLOPs per token are within 5% of
  Engram's (fewer parameters, the same compute).

It prints one table (total, activated and table parameters, FLOPs per token, tokens/s, validation loss and
perplexity, and the differences to the MoE), saves the loss curves of all three in one plot and a gate heatmap
of validation text, saves the Engram model and tokenizer, reloads them with `AutoModelForCausalLM` /
`AutoTokenizer` and generates. `--seeds 0,1,2` trains every model once per seed (initialisation and data order)
and reports means and spreads. Everything goes to `--out` (default `outputs/main`).

    python examples/main.py                              # the default run (3.5-8.5 minutes on 2 CPU cores)
    python examples/main.py --seeds 0,1,2                # three seeds: means and spreads
    python examples/main.py --files my_corpus/*.txt      # your own text files
    python examples/main.py --dataset path/to/saved_dataset --text-column text
"""

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

import modeling_engram
from modeling_engram import EngramConfig, EngramForCausalLM, build_token_map, create_engram_optimizer
from modeling_engram.allocation import allocate, count_parameters, flops_per_token
from modeling_engram.corpus import read_texts, stdlib_files, train_bpe_tokenizer
from modeling_engram.data import text_blocks_dataset, texts_blocks_dataset
from modeling_engram.visualize import gate_heatmap, plot_loss_curves

PROMPT = "def main():\n    "
BASELINE = "MoE"


def corpus(args):
    """(train texts or files, validation texts or files, kind) from --files, --dataset or the standard library."""
    if args.dataset:
        from datasets import load_dataset, load_from_disk

        path = Path(args.dataset)
        data = load_from_disk(str(path)) if (path / "dataset_dict.json").exists() else load_dataset(args.dataset)
        validation = "validation" if "validation" in data else "test"
        return data["train"], data[validation], "dataset"
    files = sorted(Path(f) for f in args.files) if args.files else None
    if files:
        cut = max(1, len(files) // 10)
        return files[cut:], files[:cut], "files"
    train, validation = stdlib_files(args.max_files)
    return train, validation, "files"


def blocks(source, kind, tokenizer, args):
    if kind == "dataset":
        return texts_blocks_dataset(source, tokenizer, args.seq_len, text_column=args.text_column)
    return text_blocks_dataset(source, tokenizer, args.seq_len)


def backbone_config(args, tokenizer, compressed: int) -> EngramConfig:
    """The shapes all three share: the MoE's experts (its routed-expert count) and the Engram layout."""
    return EngramConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=args.seq_len, n_routed_experts=args.experts, n_shared_experts=1,
        num_experts_per_tok=args.top_k, moe_intermediate_size=args.expert_width or args.hidden,
        first_k_dense_replace=1, router_bias_update_speed=args.router_bias_speed,
        engram_layer_ids=[args.engram_layer], max_ngram_size=3, n_head_per_ngram=4, n_embed_per_ngram=args.engram_width,
        engram_vocab_size=[2, 2], engram_compressed_vocab_size=compressed,  # table rows: set by `allocate`
        engram_pad_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def compute_matched_twin(config: EngramConfig, seq_len: int) -> EngramConfig:
    """A dense decoder (no experts, no Engram) whose MLP width, a multiple of 8, matches FLOPs per token within 5%."""
    target = flops_per_token(config, seq_len)
    dense = config.with_changes(engram_layer_ids=[], n_routed_experts=0, intermediate_size=8)
    wider = dense.with_changes(intermediate_size=16)
    per_width = (flops_per_token(wider, seq_len) - flops_per_token(dense, seq_len)) / 8
    width = max(8, 8 * round((8 + (target - flops_per_token(dense, seq_len)) / per_width) / 8))
    twin = dense.with_changes(intermediate_size=width)
    if abs(flops_per_token(twin, seq_len) - target) / target > 0.05:
        raise ValueError("could not match the dense twin's FLOPs per token within 5%")
    return twin


def model_configs(args, tokenizer, compressed: int) -> dict[str, EngramConfig]:
    """MoE baseline, Engram at its total and activated budget (`allocate` at `--rho`), dense FLOPs twin.

    Engram's value and key projections are activated parameters the MoE lacks, so the MoE's first (dense) FFN is
    widened by as many: both then have the same activated parameters and FLOPs, and `allocate` gives Engram the
    MoE's total.
    """
    shapes = backbone_config(args, tokenizer, compressed)
    moe = shapes.with_changes(engram_layer_ids=[])
    budget = count_parameters(moe)  # widening the MoE below adds to P_tot and P_act alike: same sparse budget
    allocation = allocate(shapes, budget.total_without_embeddings, budget.activated, args.rho)
    if not allocation.engram_rows_per_head:
        raise ValueError(f"--rho {args.rho} leaves no Engram rows at this size; lower it or add --experts.")
    engram = allocation.apply(shapes)
    extra = count_parameters(engram).activated - budget.activated
    moe = moe.with_changes(intermediate_size=moe.intermediate_size + round(extra / (3 * args.hidden)))
    print(f"allocation: MoE {moe.n_routed_experts} routed experts (first FFN {moe.intermediate_size} wide); Engram "
          f"(rho {args.rho}, achieved {allocation.achieved_rho:.3f}) {engram.n_routed_experts} routed experts, "
          f"{allocation.engram_rows_per_head:,} rows per head table (first FFN {engram.intermediate_size} wide)")
    return {BASELINE: moe, "Engram": engram, "dense": compute_matched_twin(engram, args.seq_len)}


@torch.no_grad()
def validation_loss(model, loader) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        ids = batch["input_ids"]
        total += model(ids, labels=ids).loss.item() * ids.numel()
        count += ids.numel()
    model.train()
    return total / count


def train(label, model, train_blocks, val_loader, args, seed: int) -> dict:
    """Same data order (seeded sampler), same schedule for every model; returns curves and timings."""
    optimizer = create_engram_optimizer(model, lr=args.lr, weight_decay=0.1,
                                        table_lr_multiplier=args.table_lr_multiplier, betas=(0.9, 0.95))
    schedule = get_cosine_schedule_with_warmup(optimizer, args.steps // 20, args.steps)
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(train_blocks, batch_size=args.batch_size, shuffle=True,
                                         generator=generator, drop_last=True)
    curve, val_curve, seconds, step = [], [], 0.0, 0
    model.train()
    progress = tqdm(total=args.steps, desc=f"train {label}")
    while step < args.steps:
        for batch in loader:
            ids = batch["input_ids"]
            started = time.perf_counter()
            loss = model(ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            seconds += time.perf_counter() - started
            step += 1
            curve.append(loss.item())
            if step % args.eval_every == 0 or step == args.steps:
                val_curve.append((step, validation_loss(model, val_loader)))
                progress.set_postfix(loss=f"{loss.item():.3f}", val=f"{val_curve[-1][1]:.3f}")
            progress.update()
            if step == args.steps:
                break
    progress.close()
    return {"train_loss": curve, "val_loss": val_curve, "tokens_per_second": step * ids.numel() / seconds}


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _plus_minus(mean: float, spread: float, digits: int, seeds: int) -> str:
    return f"{mean:+.{digits}f} ± {spread:.{digits}f}" if seeds > 1 else f"{mean:+.{digits}f}"


def report(configs: dict, runs: dict[str, list[dict]], seq_len: int) -> list[dict]:
    """Print the table (means over seeds, ± sample standard deviation) and return its rows."""
    seeds = len(runs[BASELINE])
    rows = []
    for name, config in configs.items():
        counts = count_parameters(config)
        losses = [run["val_loss"][-1][1] for run in runs[name]]
        loss, spread = mean_and_spread(losses)
        rows.append({"model": name, "total_parameters": counts.total, "active_parameters": counts.activated,
                     "table_parameters": counts.engram_tables, "flops_per_token": flops_per_token(config, seq_len),
                     "tokens_per_second": statistics.fmean(run["tokens_per_second"] for run in runs[name]),
                     "val_loss": loss, "val_loss_spread": spread, "val_losses": losses,
                     "val_perplexity": math.exp(loss)})
    base = rows[0]
    for row in rows[1:]:
        gaps = [loss - base_loss for loss, base_loss in zip(row["val_losses"], base["val_losses"])]
        row["val_loss_difference"], row["val_loss_difference_spread"] = mean_and_spread(gaps)
    loss_header = "val loss (mean ± sd)" if seeds > 1 else "val loss"
    print(f"\n{seeds} seed(s)\n| model | total params | active params | table params | FLOPs/token | tokens/s | "
          f"{loss_header} | val ppl |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        loss = f"{row['val_loss']:.4f}" + (f" ± {row['val_loss_spread']:.4f}" if seeds > 1 else "")
        print(f"| {row['model']} | {row['total_parameters'] / 1e6:.2f}M | {row['active_parameters'] / 1e6:.2f}M | "
              f"{row['table_parameters'] / 1e6:.2f}M | {row['flops_per_token'] / 1e6:.2f}M | "
              f"{row['tokens_per_second']:,.0f} | {loss} | {row['val_perplexity']:.2f} |")
    for row in rows[1:]:
        ratio = {key: row[key] / base[key] - 1 for key in ("total_parameters", "active_parameters", "flops_per_token",
                                                           "tokens_per_second")}
        print(f"| {row['model']} - {BASELINE} | {ratio['total_parameters']:+.1%} | {ratio['active_parameters']:+.1%} | "
              f"| {ratio['flops_per_token']:+.1%} | {ratio['tokens_per_second']:+.1%} | "
              f"**{_plus_minus(row['val_loss_difference'], row['val_loss_difference_spread'], 4, seeds)}** | "
              f"{row['val_perplexity'] - base['val_perplexity']:+.2f} |")
    return rows


def mean_curves(runs: list[dict]) -> tuple[list[float], list[tuple[int, float]]]:
    """Training and validation curves averaged over seeds (every seed logs the same steps)."""
    train_loss = [statistics.fmean(values) for values in zip(*(run["train_loss"] for run in runs))]
    val_loss = [(points[0][0], statistics.fmean(value for _, value in points))
                for points in zip(*(run["val_loss"] for run in runs))]
    return train_loss, val_loss


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="*", help="your own text files (split by file, 90/10)")
    parser.add_argument("--dataset", help="a `datasets` dataset (saved folder or loadable name) with train/validation")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--max-files", type=int, default=None, help="standard-library files to use (default all)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=32, help="routed experts per MoE layer of the MoE baseline")
    parser.add_argument("--top-k", type=int, default=2, help="routed experts per token")
    parser.add_argument("--expert-width", type=int, default=None, help="moe_intermediate_size (default --hidden)")
    parser.add_argument("--router-bias-speed", type=float, default=1e-2,
                        help="balancing-bias step per optimizer step (1e-2: the bias moves within a short run)")
    parser.add_argument("--rho", type=float, default=0.8, help="share of the sparse budget Engram leaves to experts")
    parser.add_argument("--engram-layer", type=int, default=1, help="the Engram layer (the paper's best single: early)")
    parser.add_argument("--engram-width", type=int, default=128, help="n_embed_per_ngram (4 heads per order)")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--val-blocks", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--table-lr-multiplier", type=float, default=5.0)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (initialisation and data order)")
    parser.add_argument("--out", type=Path, default=Path("outputs/main"))
    return parser


def prepare_data(args):
    """Corpus, tokenizer, token map and blocks: (tokenizer, token_map, compressed, train_blocks, val_loader, sample)."""
    train_source, val_source, kind = corpus(args)
    train_texts = read_texts(train_source) if kind == "files" else list(train_source[args.text_column])
    print(f"corpus: {len(train_source)} train / {len(val_source)} validation documents ({kind})")
    tokenizer = train_bpe_tokenizer(train_texts, args.vocab_size)
    token_map, compressed = build_token_map(tokenizer)
    print(f"tokenizer: {len(tokenizer)} tokens -> {compressed} compressed ids ({1 - compressed / len(tokenizer):.1%})")
    train_blocks = blocks(train_source, kind, tokenizer, args).with_format("torch")
    val_blocks = blocks(val_source, kind, tokenizer, args).with_format("torch")
    val_blocks = val_blocks.select(range(min(args.val_blocks, len(val_blocks))))
    val_loader = torch.utils.data.DataLoader(val_blocks, batch_size=32)
    print(f"data: {len(train_blocks)} train and {len(val_blocks)} validation blocks of {args.seq_len} tokens")
    sample = read_texts(val_source[:1])[0] if kind == "files" else val_source[0][args.text_column]
    return tokenizer, token_map, compressed, train_blocks, val_loader, sample


def main():
    args = argument_parser().parse_args()
    started = time.time()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer, token_map, compressed, train_blocks, val_loader, sample = prepare_data(args)
    configs = model_configs(args, tokenizer, compressed)
    runs, engram = {name: [] for name in configs}, None
    for seed in seeds:
        for name, config in configs.items():
            torch.manual_seed(seed)
            model = EngramForCausalLM(config)
            model.set_token_map(token_map)
            runs[name].append(train(f"{name} (seed {seed})", model, train_blocks, val_loader, args, seed))
            if name == "Engram" and engram is None:
                engram = model.eval()
    rows = report(configs, runs, args.seq_len)
    curves = {name: mean_curves(name_runs) for name, name_runs in runs.items()}
    plot_loss_curves({name: curve[0] for name, curve in curves.items()}, args.out / "loss_curves.png",
                     "MoE vs Engram (same parameters and FLOPs) vs dense twin"
                     + (f", mean of {len(seeds)} seeds" if len(seeds) > 1 else ""),
                     validation={name: curve[1] for name, curve in curves.items()})

    gate_heatmap(engram, tokenizer, sample[:2000], args.out / "gate_heatmap", title="Engram gates on validation text")
    model_dir = args.out / "engram_model"
    engram.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = reloaded_tokenizer(PROMPT, return_tensors="pt")
    completion = reloaded.generate(**inputs, max_new_tokens=48, do_sample=False)
    print("completion from the reloaded model:\n" + reloaded_tokenizer.decode(completion[0]))
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(args).items()},
                                                       "runs": runs}, indent=1))
    print(f"outputs in {args.out}: loss_curves.png, gate_heatmap.png/.html, engram_model/, results.json")
    print(f"done in {time.time() - started:.0f}s (modeling_engram {modeling_engram.__version__})")


if __name__ == "__main__":
    main()
