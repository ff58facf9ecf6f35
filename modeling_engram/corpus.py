"""The embedded default corpus: the running interpreter's own standard-library sources, split by file."""

import random
import sysconfig
from pathlib import Path


def stdlib_files(max_files: int | None = None, seed: int = 0, min_bytes: int = 2_000) -> tuple[list[Path], list[Path]]:
    """Standard-library `.py` files (shuffled with `seed`), split by file: 90% train, 10% validation."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > min_bytes)
    random.Random(seed).shuffle(files)
    files = files[:max_files]
    cut = max(1, len(files) // 10)
    return files[cut:], files[:cut]


def read_texts(files: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE `PreTrainedTokenizerFast` with <pad>, <s>, </s> (ids 0, 1, 2) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


__all__ = ["stdlib_files", "read_texts", "train_bpe_tokenizer"]
