"""Build, train briefly, generate with, save and reload a small Engram model on embedded data.

The data is the Python standard library's own source (present on every machine), split by file. A byte-level
BPE tokenizer is trained on the train split, its Engram token map built, and a small EngramForCausalLM trained
for a few hundred steps. The model and tokenizer are saved with `save_pretrained` and reloaded through
`AutoModelForCausalLM` / `AutoTokenizer`; the reload must give identical logits and the same completion.

    python examples/main.py                 # default: ~1 minute on 2 CPU cores
    python examples/main.py --steps 20 --max-files 40 --out outputs/smoke
"""

import argparse
import sysconfig
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import modeling_engram
from modeling_engram import EngramConfig, EngramForCausalLM, build_token_map
from modeling_engram.corpus import read_texts, stdlib_files, train_bpe_tokenizer


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
    return torch.tensor(ids, dtype=torch.long)


def batches(stream: torch.Tensor, batch_size: int, seq_len: int, steps: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=generator)
        yield torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def validation_loss(model, stream: torch.Tensor, seq_len: int, max_chunks: int = 32) -> float:
    model.eval()
    chunks = stream[: (len(stream) // seq_len) * seq_len].view(-1, seq_len)[:max_chunks]
    loss = model(chunks, labels=chunks).loss.item()
    model.train()
    return loss


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-files", type=int, default=200)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=Path("outputs/main"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    started = time.time()

    train_files, val_files = stdlib_files(args.max_files, args.seed)
    train_texts, val_texts = read_texts(train_files), read_texts(val_files)
    print(f"corpus: {len(train_files)} train / {len(val_files)} validation files of {sysconfig.get_paths()['stdlib']}")
    tokenizer = train_bpe_tokenizer(train_texts, args.vocab_size)
    token_map, compressed = build_token_map(tokenizer)
    print(f"tokenizer: {len(tokenizer)} tokens -> {compressed} compressed ids "
          f"({1 - compressed / len(tokenizer):.1%} reduction)")

    config = EngramConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_len * 4,
        engram_layer_ids=[1], max_ngram_size=3, n_head_per_ngram=4, n_embed_per_ngram=64,
        engram_vocab_size=[20_011, 20_011], engram_compressed_vocab_size=compressed,
        engram_pad_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = EngramForCausalLM(config)
    model.set_token_map(token_map)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"Engram at layers {config.engram_layer_ids}, tables {config.engram_table_sizes[0][:2]}... rows per head")

    train_stream, val_stream = token_stream(tokenizer, train_texts), token_stream(tokenizer, val_texts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    model.train()
    progress = tqdm(batches(train_stream, args.batch_size, args.seq_len, args.steps, args.seed),
                    total=args.steps, desc="train")
    for batch in progress:
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    print(f"validation loss: {validation_loss(model, val_stream, args.seq_len):.3f}")

    prompt = "def main():\n    "
    inputs = tokenizer(prompt, return_tensors="pt")
    completion = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    print("completion:\n" + tokenizer.decode(completion[0]))

    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    reloaded = AutoModelForCausalLM.from_pretrained(args.out).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(args.out)
    inputs = reloaded_tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        same_logits = torch.equal(reloaded(**inputs).logits, model(**inputs).logits)
    same_completion = torch.equal(reloaded.generate(**inputs, max_new_tokens=40, do_sample=False), completion)
    print(f"saved to {args.out}; reloaded through AutoModelForCausalLM ({type(reloaded).__name__}): "
          f"identical logits={same_logits}, identical completion={same_completion}")
    if not (same_logits and same_completion):
        raise SystemExit("reloaded model differs from the saved one")
    print(f"done in {time.time() - started:.0f}s (modeling_engram {modeling_engram.__version__})")


if __name__ == "__main__":
    main()
