import collections

import pytest
import torch
from reference_hashing import reference_token_map
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import PreTrainedTokenizerFast

from modeling_engram import build_token_map
from modeling_engram.token_map import compression_keys


def test_paper_table6_on_deepseek_v3(deepseek_v3_tokenizer):
    token_map, compressed = build_token_map(deepseek_v3_tokenizer)
    assert len(deepseek_v3_tokenizer) == 128_815
    assert token_map.shape == (128_815,) and token_map.dtype == torch.long
    assert compressed == 98_627
    reduction = 1 - compressed / 128_815
    assert 0.2343 <= reduction < 0.2344  # paper: 23.43%
    groups = collections.Counter(compression_keys(deepseek_v3_tokenizer))
    assert groups.most_common(5) == [(" ", 163), ("a", 54), ("o", 40), ("e", 35), ("i", 30)]


def test_matches_independent_reference(deepseek_v3_tokenizer):
    token_map, compressed = build_token_map(deepseek_v3_tokenizer)
    reference, reference_size = reference_token_map(deepseek_v3_tokenizer)
    assert compressed == reference_size
    assert torch.equal(token_map, torch.from_numpy(reference))


def _byte_level_tokenizer(vocab: dict[str, int]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_rules_on_a_hand_made_vocabulary():
    # ByteLevel tokens: "Ġ" is a space, "Ċ" a newline, "Ã©" the bytes of "é"; "Ã" and "Ä" alone are lone UTF-8
    # lead bytes, which decode to U+FFFD.
    vocab = {"[UNK]": 0, "Hello": 1, "hello": 2, "ĠHELLO": 3, "Ġ": 4, "ĠĠ": 5, "Ċ": 6, "Ã©": 7, "e": 8, "Ã": 9, "Ä": 10}
    tokenizer = _byte_level_tokenizer(vocab)
    token_map, compressed = build_token_map(tokenizer)
    ids = {k: token_map[v].item() for k, v in vocab.items()}
    assert ids["Hello"] == ids["hello"] == ids["ĠHELLO"]  # lowercase + strip
    assert ids["Ġ"] == ids["ĠĠ"] == ids["Ċ"]  # whitespace-only tokens all become " "
    assert ids["Ã©"] == ids["e"]  # accents stripped
    assert ids["Ã"] != ids["Ä"]  # invalid UTF-8 alone: keyed by the raw token string, so not merged
    assert compressed == len(set(ids.values()))
    assert sorted(set(token_map.tolist())) == list(range(compressed))


def test_vocab_size_padding(deepseek_v3_tokenizer):
    token_map, compressed = build_token_map(deepseek_v3_tokenizer, vocab_size=129_280)
    assert token_map.shape == (129_280,) and compressed == 98_627
    pad = deepseek_v3_tokenizer.pad_token_id
    assert (token_map[128_815:] == token_map[pad]).all()
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_token_map(deepseek_v3_tokenizer, vocab_size=1000)


def test_plain_tokenizers_object_gives_the_same_map(deepseek_v3_tokenizer):
    from_hf, size = build_token_map(deepseek_v3_tokenizer)
    from_backend, backend_size = build_token_map(deepseek_v3_tokenizer.backend_tokenizer)
    assert size == backend_size and torch.equal(from_hf, from_backend)
