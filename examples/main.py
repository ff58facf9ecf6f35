"""The main job: an Engram model against a compute-matched twin without Engram, on real text.

Default data: the Python standard library's own source files (present on every machine), split by file into
train and validation, read through `datasets`; a byte-level BPE tokenizer is trained on the train split and its
Engram token map built. Two models train on the same tokens in the same order with the same schedule:

- Engram: a small Llama-style decoder with Engram at layer 1 (the paper's best single placement: early),
  tables trained with the paper's recipe (Adam, 5x learning rate, no weight decay, sparse row updates);
- twin: the same decoder without Engram, its MLPs widened until its FLOPs per token are within 5% of Engram's.

It prints a table (parameters, FLOPs per token, tokens/s, validation loss and perplexity), saves a loss-curve
plot and a gate heatmap of validation text, saves the Engram model and tokenizer, reloads them with
`AutoModelForCausalLM` / `AutoTokenizer` and generates. Everything goes to `--out` (default `outputs/main`).

    python examples/main.py                              # the full default run (about 11 minutes on 2 CPU cores)
    python examples/main.py --files my_corpus/*.txt      # your own text files
    python examples/main.py --dataset path/to/saved_dataset --text-column text
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

import modeling_engram
from modeling_engram import EngramConfig, EngramForCausalLM, build_token_map, create_engram_optimizer
from modeling_engram.allocation import config_with, count_parameters, flops_per_token
from modeling_engram.corpus import read_texts, stdlib_files, train_bpe_tokenizer
from modeling_engram.data import text_blocks_dataset, texts_blocks_dataset
from modeling_engram.visualize import gate_heatmap, plot_loss_curves

PROMPT = "def main():\n    "


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
    train, validation = stdlib_files(args.max_files, args.seed)
    return train, validation, "files"


def blocks(source, kind, tokenizer, args):
    if kind == "dataset":
        return texts_blocks_dataset(source, tokenizer, args.seq_len, text_column=args.text_column)
    return text_blocks_dataset(source, tokenizer, args.seq_len)


def engram_config(args, tokenizer, compressed: int) -> EngramConfig:
    return EngramConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=args.seq_len, engram_layer_ids=[1], max_ngram_size=3, n_head_per_ngram=4,
        n_embed_per_ngram=args.engram_width, engram_vocab_size=[args.table_rows, args.table_rows],
        engram_compressed_vocab_size=compressed, engram_pad_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def compute_matched_twin(config: EngramConfig, seq_len: int) -> EngramConfig:
    """The same decoder without Engram, MLP width raised in steps of 8 until FLOPs per token match within 5%."""
    target = flops_per_token(config, seq_len)
    twin = config_with(config, engram_layer_ids=[])
    while flops_per_token(twin, seq_len) < target:
        twin = config_with(twin, intermediate_size=twin.intermediate_size + 8)
    if abs(flops_per_token(twin, seq_len) - target) / target > 0.05:
        raise ValueError("could not match the twin's FLOPs per token within 5%")
    return twin


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


def train(name, model, train_blocks, val_loader, args) -> dict:
    """Same data order (seeded sampler), same schedule for every model; returns curves and timings."""
    optimizer = create_engram_optimizer(model, lr=args.lr, weight_decay=0.1,
                                        table_lr_multiplier=args.table_lr_multiplier, betas=(0.9, 0.95))
    schedule = get_cosine_schedule_with_warmup(optimizer, args.steps // 20, args.steps)
    generator = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(train_blocks, batch_size=args.batch_size, shuffle=True,
                                         generator=generator, drop_last=True)
    curve, val_curve, seconds, step = [], [], 0.0, 0
    model.train()
    progress = tqdm(total=args.steps, desc=f"train {name}")
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


def report(configs: dict, results: dict, seq_len: int) -> list[dict]:
    rows = []
    for name, config in configs.items():
        counts = count_parameters(config)
        loss = results[name]["val_loss"][-1][1]
        rows.append({"model": name, "total_parameters": counts.total, "active_parameters": counts.activated,
                     "flops_per_token": flops_per_token(config, seq_len),
                     "tokens_per_second": results[name]["tokens_per_second"],
                     "val_loss": loss, "val_perplexity": math.exp(loss)})
    print("\n| model | total params | active params | FLOPs/token | tokens/s | val loss | val ppl |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['total_parameters'] / 1e6:.2f}M | {row['active_parameters'] / 1e6:.2f}M | "
              f"{row['flops_per_token'] / 1e6:.2f}M | {row['tokens_per_second']:,.0f} | {row['val_loss']:.4f} | "
              f"{row['val_perplexity']:.2f} |")
    engram, twin = rows
    print(f"| difference (Engram - twin) | | | {engram['flops_per_token'] / twin['flops_per_token'] - 1:+.1%} | | "
          f"{engram['val_loss'] - twin['val_loss']:+.4f} | {engram['val_perplexity'] - twin['val_perplexity']:+.2f} |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="*", help="your own text files (split by file, 90/10)")
    parser.add_argument("--dataset", help="a `datasets` dataset (saved folder or loadable name) with train/validation")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--max-files", type=int, default=None, help="standard-library files to use (default all)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--engram-width", type=int, default=128, help="n_embed_per_ngram (4 heads per order)")
    parser.add_argument("--table-rows", type=int, default=40_000, help="rows per head table (engram_vocab_size)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--val-blocks", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--table-lr-multiplier", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path("outputs/main"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)

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

    configs = {"Engram": engram_config(args, tokenizer, compressed)}
    configs["twin"] = compute_matched_twin(configs["Engram"], args.seq_len)
    results, models = {}, {}
    for name, config in configs.items():
        torch.manual_seed(args.seed)
        models[name] = EngramForCausalLM(config)
        models[name].set_token_map(token_map)
        results[name] = train(name, models[name], train_blocks, val_loader, args)
    rows = report(configs, results, args.seq_len)
    plot_loss_curves({name: result["train_loss"] for name, result in results.items()}, args.out / "loss_curves.png",
                     "Engram vs compute-matched twin",
                     validation={name: result["val_loss"] for name, result in results.items()})

    engram = models["Engram"].eval()
    sample = read_texts(val_source[:1])[0] if kind == "files" else val_source[0][args.text_column]
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
                                                       "curves": results}, indent=1))
    print(f"outputs in {args.out}: loss_curves.png, gate_heatmap.png/.html, engram_model/, results.json")
    print(f"done in {time.time() - started:.0f}s (modeling_engram {modeling_engram.__version__})")


if __name__ == "__main__":
    main()
