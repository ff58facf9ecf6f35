"""Tokenizer compression: a surjective map from raw token ids to compressed ids (paper section 2.2)."""

import torch

REPLACEMENT_CHAR = "\ufffd"
_SENTINEL = "\ue000"


def _normalizer():
    from tokenizers import Regex, normalizers

    # A whitespace-only token must survive Strip as " ": swap it for a sentinel first, back afterwards.
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SENTINEL, " "),
        ]
    )


def compression_keys(tokenizer) -> list[str]:
    """The key every raw token id is merged by: its normalised decoded text, or its raw token string when the
    decode is not valid UTF-8 on its own (contains U+FFFD)."""
    from tqdm.auto import tqdm

    if hasattr(tokenizer, "batch_decode"):  # a transformers tokenizer: decode as `tokenizer.decode([id])` does
        ids = [[i] for i in range(len(tokenizer))]
        texts = tokenizer.batch_decode(ids, skip_special_tokens=False)
        to_token = tokenizer.convert_ids_to_tokens
    else:  # a `tokenizers.Tokenizer`
        ids = [[i] for i in range(tokenizer.get_vocab_size(with_added_tokens=True))]
        texts = tokenizer.decode_batch(ids, skip_special_tokens=False)
        to_token = tokenizer.id_to_token
    vocab_size = len(ids)
    normalize = _normalizer().normalize_str
    keys = []
    for token_id, text in enumerate(
        tqdm(texts, desc="token map", unit="tok", disable=vocab_size < 50_000, mininterval=0.5)
    ):
        if REPLACEMENT_CHAR in text:
            keys.append(to_token(token_id))
        else:
            keys.append(normalize(text) or text)
    return keys


def build_token_map(tokenizer, vocab_size: int | None = None) -> tuple[torch.LongTensor, int]:
    """Build the Engram token map of a tokenizer.

    Args:
        tokenizer: a `transformers` tokenizer (fast or slow) or a `tokenizers.Tokenizer`.
        vocab_size: the model's embedding size when it exceeds the tokenizer's (e.g. DeepSeek-V3: 129,280 rows for
            128,815 tokens). Ids no tokenizer produces take the compressed id of the tokenizer's pad token
            (or of id 0), so they add no compressed id.

    Returns:
        `(token_map, compressed_vocab_size)`: `token_map[raw_id]` is the compressed id, a LongTensor of length
        `vocab_size or len(tokenizer)`; compressed ids are numbered in order of first appearance.
    """
    first_id: dict[str, int] = {}
    token_map = [first_id.setdefault(key, len(first_id)) for key in compression_keys(tokenizer)]
    if vocab_size is not None:
        if vocab_size < len(token_map):
            raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's {len(token_map)} tokens.")
        fill = token_map[getattr(tokenizer, "pad_token_id", None) or 0]
        token_map += [fill] * (vocab_size - len(token_map))
    return torch.tensor(token_map, dtype=torch.long), len(first_id)


__all__ = ["build_token_map", "compression_keys"]
