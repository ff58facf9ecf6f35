"""Causal-LM training data from local text files with `datasets`: tokenise, concatenate, cut into blocks."""

from collections.abc import Iterable
from os import PathLike


def text_blocks_dataset(
    files: Iterable[str | PathLike],
    tokenizer,
    block_size: int,
    *,
    eos_between_files: bool = True,
    group_batch_size: int = 1000,
    num_proc: int | None = None,
    cache_dir: str | PathLike | None = None,
):
    """A `datasets.Dataset` of `block_size`-token training blocks from local text files.

    Each file is one document (`load_dataset("text", sample_by="document")`), tokenised with `tokenizer` in a
    batched `map`, followed by `tokenizer.eos_token_id` (unless `eos_between_files=False`); the documents are
    concatenated in file order and cut into consecutive blocks, dropping the last partial block. Columns:
    `input_ids` and `labels` (equal: the model shifts them), ready for `Trainer` with its default collator.
    """
    from datasets import load_dataset

    files = [str(f) for f in files]
    if not files:
        raise ValueError("text_blocks_dataset needs at least one text file.")
    texts = load_dataset(
        "text", data_files={"train": files}, split="train", sample_by="document", cache_dir=cache_dir
    )
    return texts_blocks_dataset(texts, tokenizer, block_size, eos_between_files=eos_between_files,
                                group_batch_size=group_batch_size, num_proc=num_proc)


def texts_blocks_dataset(
    texts,
    tokenizer,
    block_size: int,
    *,
    text_column: str = "text",
    eos_between_files: bool = True,
    group_batch_size: int = 1000,
    num_proc: int | None = None,
):
    """`text_blocks_dataset` for a `datasets.Dataset` whose `text_column` holds one document per row."""
    if block_size < 1:
        raise ValueError(f"block_size={block_size} is invalid; it must be >= 1.")
    if text_column not in texts.column_names:
        raise ValueError(f"text_column={text_column!r} is not a column of the dataset ({texts.column_names}).")
    eos = [tokenizer.eos_token_id] if eos_between_files else []
    if eos_between_files and tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; pass eos_between_files=False or set an eos token.")

    def tokenize(batch):
        ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        return {"input_ids": [row + eos for row in ids]}

    def group(batch):
        stream = [token for row in batch["input_ids"] for token in row]
        blocks = [stream[start : start + block_size] for start in range(0, len(stream) - block_size + 1, block_size)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

    tokens = texts.map(tokenize, batched=True, remove_columns=texts.column_names, num_proc=num_proc)
    return tokens.map(group, batched=True, batch_size=group_batch_size, num_proc=num_proc)


__all__ = ["text_blocks_dataset", "texts_blocks_dataset"]
