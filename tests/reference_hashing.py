"""An independent numpy reference of the Engram hash contract, written from DESIGN.md / the paper's demo.

It shares no code with `modeling_engram`: primes by trial division, its own compression loop over
`tokenizer.decode([id])`, numpy int64 arithmetic with numpy's floor `%`.
"""

import unicodedata

import numpy as np


def trial_division_is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def reference_table_sizes(layer_ids, engram_vocab_size, n_head_per_ngram):
    seen, sizes = set(), {}
    for layer_id in layer_ids:
        per_order = []
        for rows in engram_vocab_size:
            heads, start = [], rows - 1
            for _ in range(n_head_per_ngram):
                candidate = start + 1
                while not trial_division_is_prime(candidate) or candidate in seen:
                    candidate += 1
                seen.add(candidate)
                heads.append(candidate)
                start = candidate
            per_order.append(heads)
        sizes[layer_id] = per_order
    return sizes


def reference_multipliers(layer_ids, max_ngram_size, compressed_vocab_size, seed):
    half_bound = max(1, int(np.iinfo(np.int64).max // compressed_vocab_size) // 2)
    out = {}
    for layer_id in layer_ids:
        g = np.random.default_rng(int(seed + 10007 * int(layer_id)))
        out[layer_id] = g.integers(low=0, high=half_bound, size=(max_ngram_size,), dtype=np.int64) * 2 + 1
    return out


def _normalize(text: str) -> str:
    import re

    text = unicodedata.normalize("NFKC", text)
    text = unicodedata.normalize("NFD", text)
    text = "".join(c for c in text if not unicodedata.category(c).startswith("M"))
    text = text.lower()
    text = re.sub(r"[ \t\r\n]+", " ", text)
    return " " if text == " " else text.strip()


def reference_token_map(tokenizer):
    """The demo's CompressedTokenizer rule, decoding one id at a time (slow, independent)."""
    key_to_new, lookup = {}, []
    for tid in range(len(tokenizer)):
        text = tokenizer.decode([tid], skip_special_tokens=False)
        if "\ufffd" in text:
            key = tokenizer.convert_ids_to_tokens(tid)
        else:
            key = _normalize(text) or text
        lookup.append(key_to_new.setdefault(key, len(key_to_new)))
    return np.array(lookup, dtype=np.int64), len(key_to_new)


def reference_hash(compressed_ids, layer_ids, multipliers, table_sizes, max_ngram_size, n_head_per_ngram, pad_id,
                   dead=None):
    """`{layer_id: int64 [B, T, (N-1) * H]}` for compressed ids [B, T]; `pad_id` is already compressed.

    `dead` [B, T] bool marks dead tokens (DeepSeek-V4.1): x'_{t-k} reads the pad id when any of x_{t-k} .. x_t is
    dead, checked position by position.
    """
    x = np.asarray(compressed_ids, dtype=np.int64)
    batch, length = x.shape
    shifts = [x] + [
        np.pad(x, ((0, 0), (k, 0)), mode="constant", constant_values=pad_id)[:, :length]
        for k in range(1, max_ngram_size)
    ]
    if dead is not None:
        for k in range(max_ngram_size):
            for b in range(batch):
                for t in range(length):
                    if any(dead[b][i] for i in range(max(0, t - k), t + 1)):
                        shifts[k][b, t] = pad_id
    out = {}
    for layer_id in layer_ids:
        m = multipliers[layer_id]
        heads = []
        for n in range(2, max_ngram_size + 1):
            mix = shifts[0] * m[0]
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifts[k] * m[k])
            for j in range(n_head_per_ngram):
                heads.append(mix % int(table_sizes[layer_id][n - 2][j]))
        out[layer_id] = np.stack(heads, axis=2)
    return out
