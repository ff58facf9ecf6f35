"""Forward throughput with Engram tables resident, in host memory and on disk; prefetch and the hot-row cache.

    python bench/offload.py                       # ~1.6 GB of tables, 4 x 256-token batches, a few minutes
    python bench/offload.py --rows 100000 --rounds 4   # quick

One model (Engram at layers 1 and 3, after a transformer block as in the paper) is saved once, then loaded in
every placement; the placements run interleaved, round by round, on the same real-text batches (validation files
of the standard library, BPE tokenizer trained on the train files), and the median tokens/s of each is reported
with its ratio to resident tables. Disk "cold" drops the table pages from the process (madvise) and from the page
cache (posix_fadvise DONTNEED) before every forward, so every row is read from the file again; "warm" leaves
them cached. On a GPU the backbone runs there and "host" tables are pinned CPU memory.
"""

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modeling_engram import EngramConfig, EngramForCausalLM, build_token_map
from modeling_engram.corpus import read_texts, stdlib_files, train_bpe_tokenizer


def real_text_batches(tokenizer, texts, batch_size, seq_len, count):
    ids = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
    stream = torch.tensor(ids)
    usable = (len(stream) // seq_len) * seq_len
    chunks = stream[:usable].view(-1, seq_len)
    if len(chunks) < batch_size * count:
        raise SystemExit(f"not enough text for {count} batches of {batch_size} x {seq_len}")
    return [chunks[i * batch_size : (i + 1) * batch_size] for i in range(count)]


@torch.no_grad()
def time_placements(models: dict, batches, device: torch.device, cold: dict | None = None, **forward_kwargs) -> dict:
    """`{name: [seconds per forward]}`: every model runs each batch in turn, round by round, so that machine load hits
    all placements alike. `cold[name]` lists tables whose pages are dropped before each of that model's forwards."""
    seconds = {name: [] for name in models}
    for batch in tqdm(batches, desc="rounds"):
        batch = batch.to(device)
        for name, model in models.items():
            for table in (cold or {}).get(name, ()):
                table.storage.release_pages()
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            model(batch, **forward_kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - started)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400_000, help="rows per head table (8 heads x 2 orders x 2 layers)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--cache-rows", type=int, default=65_536)
    parser.add_argument("--folder", type=Path, default=None, help="where to save the model (default: a temp dir)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    train_files, val_files = stdlib_files(seed=0)
    tokenizer = train_bpe_tokenizer(read_texts(train_files), 8192)
    token_map, compressed = build_token_map(tokenizer)
    config = EngramConfig(
        vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
        num_attention_heads=8, engram_layer_ids=[1, 3], n_head_per_ngram=8, n_embed_per_ngram=256,
        engram_vocab_size=[args.rows, args.rows], engram_compressed_vocab_size=compressed,
        engram_pad_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    folder = args.folder or Path(tempfile.mkdtemp(prefix="engram-offload-"))
    model = EngramForCausalLM(config)
    model.set_token_map(token_map)
    table_bytes = sum(model.model.layers[i].engram.table.weight.nbytes for i in config.engram_layer_ids)
    model.save_pretrained(folder)
    del model
    warmup = real_text_batches(tokenizer, read_texts(train_files), args.batch_size, args.seq_len, 16)
    batches = real_text_batches(tokenizer, read_texts(val_files), args.batch_size, args.seq_len, args.rounds)

    variants = {
        "(a) resident": dict(engram_storage="device"),
        "(b) host, no prefetch": dict(engram_storage="host", engram_prefetch=False),
        "(c) host, prefetch": dict(engram_storage="host", engram_prefetch=True),
        "(d) host, prefetch + cache": dict(engram_storage="host", engram_prefetch=True, engram_cache_rows=args.cache_rows),
        "(e) disk warm, prefetch": dict(engram_storage="disk", engram_prefetch=True),
        "(f) disk cold, no prefetch": dict(engram_storage="disk", engram_prefetch=False),
        "(g) disk cold, prefetch": dict(engram_storage="disk", engram_prefetch=True),
    }
    # Cold models map their own copy of the checkpoint: pages mapped by a warm model could not be dropped.
    cold_folder = folder.with_name(folder.name + "-cold")
    shutil.copytree(folder, cold_folder, dirs_exist_ok=True)
    models = {}
    for name, kwargs in variants.items():
        source = cold_folder if "cold" in name else folder
        models[name] = EngramForCausalLM.from_pretrained(source, **kwargs).to(device).eval()
    cold_tables = [model.model.layers[i].engram.table for name, model in models.items() if "cold" in name
                   for i in config.engram_layer_ids]
    cached = models["(d) host, prefetch + cache"]
    with torch.no_grad():
        for batch in warmup:  # the cache learns which rows are hot from other (training) text
            cached(batch.to(device))
    for layer_id in config.engram_layer_ids:
        cached.model.layers[layer_id].engram.table.cache.reset_stats()

    seconds = time_placements(models, batches, device, cold={name: cold_tables for name in models if "cold" in name})

    tokens = args.batch_size * args.seq_len
    base = tokens / statistics.median(seconds["(a) resident"])
    print(f"\ndevice {device}, tables {table_bytes / 1e9:.2f} GB ({2 * 2 * 8 * args.rows:,} rows of "
          f"{config.n_embed_per_ngram // config.n_head_per_ngram} fp32), batch {args.batch_size} x {args.seq_len}, "
          f"{args.rounds} rounds, median tokens/s")
    print("| placement | tokens/s | ratio to (a) |\n|---|---|---|")
    for name, times in seconds.items():
        rate = tokens / statistics.median(times)
        print(f"| {name} | {rate:,.0f} | {rate / base:.3f} |")
    hit = cached.engram_cache_stats()
    print("hot-row cache hit rate on validation text (unique rows per batch): "
          + ", ".join(f"layer {k}: {v['hit_rate']:.1%}" for k, v in hit.items())
          + f" with {args.cache_rows:,} cached rows per table")


if __name__ == "__main__":
    main()
