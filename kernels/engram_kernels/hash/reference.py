"""Readable torch reference of the n-gram hash: one layer, one order, one head at a time (floor `%`)."""

import torch


def ngram_hash_reference(
    ids: torch.Tensor,
    token_map: torch.Tensor,
    multipliers: torch.Tensor,
    table_sizes: torch.Tensor,
    *,
    pad_id: int,
    history: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
    compressed: bool = False,
    dead: torch.Tensor | None = None,
) -> torch.LongTensor:
    """Same arguments and result as `ngram_hash`: `[L, B, T, (N-1) * H]` int64."""
    layers, n = multipliers.shape
    heads = table_sizes.shape[1] // (n - 1)
    batch, length = ids.shape
    pad = token_map[pad_id].long()
    tokens = ids.long() if compressed else token_map[ids].long()
    if dead is not None and not compressed:
        tokens = torch.where(dead[ids].bool(), -1, tokens)
    if token_mask is not None:
        tokens = torch.where(token_mask.bool(), tokens, pad)
    before = history.long() if history is not None else pad.expand(batch, n - 1)
    tokens = torch.cat([before, tokens], dim=1)  # [B, N-1+T]
    out = torch.empty(layers, batch, length, (n - 1) * heads, dtype=torch.long, device=ids.device)
    for layer in range(layers):
        mix = torch.zeros(batch, length, dtype=torch.long, device=ids.device)
        cut = torch.zeros(batch, length, dtype=torch.bool, device=ids.device)
        for k in range(n):
            previous = tokens[:, n - 1 - k : n - 1 - k + length]  # x'_{t-k}
            if dead is not None:  # x'_{t-k} reads the pad id once any of x_{t-k} .. x_t is dead
                cut = cut | (previous < 0)
                previous = torch.where(cut, pad, previous)
            mix = mix ^ (previous * multipliers[layer, k])
            if k == 0:
                continue
            for head in range(heads):
                col = (k - 1) * heads + head
                out[layer, :, :, col] = torch.remainder(mix, table_sizes[layer, col])
        if offsets is not None:
            out[layer] += offsets[layer]
    return out


__all__ = ["ngram_hash_reference"]
