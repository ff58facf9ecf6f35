"""engram-serve throughput at 1, 4 and 16 concurrent clients, on the main job's Engram model.

    OMP_NUM_THREADS=1 python bench/serving.py                  # the run in docs/benchmarks.md (~3 min here)
    python bench/serving.py --clients 1,4,16 --rounds 3 --max-tokens 64

The model is `examples/main.py`'s Engram model at its default sizes (hidden 192, 4 layers, DeepSeekMoE with 26 routed
experts, Engram at layer 1 with 7,776 rows per head table; 128-token context), randomly initialised (throughput does
not depend on training), with a byte-level BPE tokenizer of 4,096 tokens trained on standard-library files as the
job does, saved to a temporary folder. `engram-serve` (python -m modeling_engram.serving) serves it from a
subprocess on 127.0.0.1; each client is a thread of this process that sends greedy completion requests through the
`openai` client, one after another, each a different 32-token piece of standard-library source asking for
`--max-tokens` tokens. Every level runs `--rounds` times, the levels interleaved (1, 4, 16, 1, 4, 16, ...) so that
the load of a shared machine hits them alike; the table gives the median of each level's rounds, and each round's
tokens/s against the one-client level of the same round. tokens/s counts completion tokens (usage.completion_tokens)
over the wall time of the level's round.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import main  # noqa: E402  (examples/main.py)

from modeling_engram import EngramForCausalLM, build_token_map  # noqa: E402
from modeling_engram.corpus import read_texts, stdlib_files, train_bpe_tokenizer  # noqa: E402

NAME = "main-job-engram"


def main_job_model(folder: Path, files: int) -> list[str]:
    """Save the main job's Engram model (random weights) and its tokenizer to `folder`; returns validation texts."""
    args = main.argument_parser().parse_args([])
    train_files, validation_files = stdlib_files(files)
    tokenizer = train_bpe_tokenizer(read_texts(train_files), args.vocab_size)
    token_map, compressed = build_token_map(tokenizer)
    config = main.model_configs(args, tokenizer, compressed)["Engram"]
    torch.manual_seed(0)
    model = EngramForCausalLM(config).eval()
    model.set_token_map(token_map)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}, "
          f"context {config.max_position_embeddings}, Engram layers {config.engram_layer_ids}")
    return read_texts(validation_files)


def prompts(texts: list[str], folder: Path, count: int, length: int) -> list[list[int]]:
    """`count` different `length`-token pieces of the texts, as token ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = [t for text in texts for t in tokenizer(text)["input_ids"]]
    step = max(length, (len(ids) - length) // count)
    return [ids[i * step : i * step + length] for i in range(count)]


def start_server(folder: Path, max_batch_size: int) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "modeling_engram.serving", str(folder), "--port", "0", "--served-model-name",
               NAME, "--device", "cpu", "--max-batch-size", str(max_batch_size)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in server.stdout:
        found = re.search(r"at (http://127\.0\.0\.1:\d+/v1)", line)
        if found:
            threading.Thread(target=lambda: [None for _ in server.stdout], daemon=True).start()  # drain its log
            return server, found[1]
    raise RuntimeError(f"engram-serve did not start (exit status {server.wait()})")


def run_level(url: str, clients: int, requests: list[list[int]], max_tokens: int) -> dict:
    """`clients` threads share `requests`, each sending its next one when its last came back."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    pending = list(reversed(requests))
    lock = threading.Lock()
    tokens = []

    def worker():
        while True:
            with lock:
                if not pending:
                    return
                prompt = pending.pop()
            response = client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0)
            tokens.append(response.usage.completion_tokens)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(worker) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - started
    return {"requests/s": len(tokens) / wall, "tokens/s": sum(tokens) / wall, "requests": len(tokens),
            "tokens": sum(tokens), "wall": wall}


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--requests", type=int, default=64, help="requests per level and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--files", type=int, default=80, help="standard-library files for the tokenizer")
    return parser


def bench() -> None:
    args = argument_parser().parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        texts = main_job_model(folder, args.files)
        requests = prompts(texts, folder, args.requests, args.prompt_tokens)
        server, url = start_server(folder, args.max_batch_size)
        try:
            run_level(url, 1, requests[:2], args.max_tokens)  # warm-up
            results = {level: [] for level in levels}
            for round_index in range(args.rounds):
                for level in levels:
                    result = run_level(url, level, requests, args.max_tokens)
                    results[level].append(result)
                    print(f"round {round_index + 1}, {level:2d} clients: {result['requests/s']:.2f} requests/s, "
                          f"{result['tokens/s']:.1f} tokens/s ({result['tokens']} tokens, {result['wall']:.1f} s)",
                          flush=True)
        finally:
            server.terminate()
            server.wait(60)
    first = levels[0]
    print(f"\n| clients | requests/s | tokens/s | tokens/s vs {first} client{'s' * (first > 1)}, per round (median) |")
    print("|---|---|---|---|")
    for level in levels:
        rps = statistics.median(r["requests/s"] for r in results[level])
        tps = statistics.median(r["tokens/s"] for r in results[level])
        ratios = [r["tokens/s"] / b["tokens/s"] for r, b in zip(results[level], results[first])]
        rounds = ", ".join(f"{ratio:.2f}x" for ratio in ratios)
        print(f"| {level} | {rps:.2f} | {tps:.1f} | {rounds} ({statistics.median(ratios):.2f}x) |")


if __name__ == "__main__":
    bench()
