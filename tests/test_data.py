"""text_blocks_dataset: local text files -> tokenised with `datasets` -> consecutive causal-LM blocks."""

import pytest
from conftest import write_text_files

from modeling_engram import text_blocks_dataset


def stream(files, tokenizer):
    ids = []
    for path in files:
        ids += tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids


@pytest.mark.parametrize("block_size", [7, 64])
def test_blocks_are_the_concatenated_token_stream_cut_in_order(tmp_path, tiny_tokenizer, block_size):
    files = write_text_files(tmp_path / "text", count=3, words=40)
    blocks = text_blocks_dataset(files, tiny_tokenizer, block_size, cache_dir=tmp_path / "cache")
    expected = stream(files, tiny_tokenizer)
    assert blocks.column_names == ["input_ids", "labels"]
    assert len(blocks) == len(expected) // block_size  # the last partial block is dropped
    assert [token for row in blocks["input_ids"] for token in row] == expected[: len(blocks) * block_size]
    assert blocks["labels"] == blocks["input_ids"]
    assert expected.count(tiny_tokenizer.eos_token_id) == 3  # one per file, newlines kept inside a file
    assert tiny_tokenizer.convert_tokens_to_ids("\n") in expected


def test_group_batches_drop_their_own_partial_blocks(tmp_path, tiny_tokenizer):
    files = write_text_files(tmp_path / "text", count=3, words=40)
    per_file = text_blocks_dataset(files, tiny_tokenizer, 50, group_batch_size=1, cache_dir=tmp_path / "cache")
    lengths = [len(stream([path], tiny_tokenizer)) for path in files]
    assert len(per_file) == sum(length // 50 for length in lengths)
    assert per_file["input_ids"][0] == stream(files[:1], tiny_tokenizer)[:50]


def test_bad_arguments_are_named(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match="block_size=0 is invalid"):
        text_blocks_dataset(write_text_files(tmp_path), tiny_tokenizer, 0)
    with pytest.raises(ValueError, match="at least one text file"):
        text_blocks_dataset([], tiny_tokenizer, 8)
