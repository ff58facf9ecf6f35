"""N-gram hash ids of every Engram layer in one launch: token map, n-gram mixing, per-head modulo, offsets.

Bit-identical to `EngramHasher` (modeling_engram/hashing.py) and to the paper's demo; see README.md for the
integer contract and why Triton's C-style `%` gives the same rows as torch's floor `%` here.
"""

import torch
import triton
import triton.language as tl

from ..utils import check_runnable, next_power_of_2


@triton.jit
def _ngram_hash_kernel(
    ids_ptr,  # [B, T] raw token ids (MAP_IDS) or compressed ids
    ids_stride,
    history_ptr,  # [B, N-1] compressed ids read before position 0 (HAS_HISTORY)
    history_stride,
    mask_ptr,  # [B, T], 0 = padding: reads the pad id (HAS_MASK)
    mask_stride,
    token_map_ptr,  # [V] raw id -> compressed id
    dead_ptr,  # [V] uint8, 1 = dead raw id (HAS_DEAD; with compressed ids, dead positions hold -1)
    pad_id,  # raw pad id, compressed through the token map
    multipliers_ptr,  # [L, N] int64
    table_sizes_ptr,  # [L, K] int64, K = (N-1) * HEADS
    offsets_ptr,  # [L, K] int64 (HAS_OFFSETS)
    out_ptr,  # [L, B, T, K] int64
    B,
    T,
    N: tl.constexpr,
    HEADS: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    MAP_IDS: tl.constexpr,
    HAS_HISTORY: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    HAS_DEAD: tl.constexpr,
):
    K: tl.constexpr = (N - 1) * HEADS
    b = tl.program_id(1).to(tl.int64)
    layer = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_seq = t < T
    col = tl.arange(0, K_PAD)
    col_ok = col < K
    col_order = col // HEADS  # order n = col_order + 2
    pad = tl.load(token_map_ptr + pad_id).to(tl.int64)

    mix = tl.zeros([BLOCK_T], dtype=tl.int64)
    mix_cols = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int64)
    cut = tl.zeros([BLOCK_T], dtype=tl.int1)
    for k in tl.static_range(N):
        pos = t - k  # x'_{t-k}; negative positions read the history (or the pad id)
        from_ids = in_seq & (pos >= 0)
        x = tl.load(ids_ptr + b * ids_stride + pos, mask=from_ids, other=0).to(tl.int64)
        if MAP_IDS:
            raw = x
            x = tl.load(token_map_ptr + raw, mask=from_ids, other=0).to(tl.int64)
            if HAS_DEAD:
                x = tl.where(tl.load(dead_ptr + raw, mask=from_ids, other=0) != 0, -1, x)
        if HAS_MASK:
            keep = tl.load(mask_ptr + b * mask_stride + pos, mask=from_ids, other=1) != 0
            x = tl.where(keep, x, pad)
        if HAS_HISTORY:
            before = tl.load(history_ptr + b * history_stride + (N - 1) + pos, mask=in_seq & (pos < 0), other=0)
            x = tl.where(pos >= 0, x, before.to(tl.int64))
        else:
            x = tl.where(pos >= 0, x, pad)
        if HAS_DEAD:  # no n-gram reaches across a dead token: it and everything older read the pad id
            cut = cut | (x < 0)
            x = tl.where(cut, pad, x)
        # 0 <= x' < V' and 1 <= m <= int64_max // V' (config-validated): the product cannot overflow.
        product = x * tl.load(multipliers_ptr + layer * N + k)
        mix = mix ^ product
        if k > 0:
            mix_cols = tl.where(col_order[None, :] == k - 1, mix[:, None], mix_cols)

    sizes = tl.load(table_sizes_ptr + layer * K + col, mask=col_ok, other=1)
    rows = mix_cols % sizes[None, :]
    # A no-op for the non-negative mixes above; makes C-style `%` floor like torch's if a mix ever wraps negative.
    rows = tl.where(rows < 0, rows + sizes[None, :], rows)
    if HAS_OFFSETS:
        rows += tl.load(offsets_ptr + layer * K + col, mask=col_ok, other=0)[None, :]
    out = out_ptr + ((layer * B + b) * T + t)[:, None] * K + col[None, :]
    tl.store(out, rows, mask=in_seq[:, None] & col_ok[None, :])


def _launch_ngram_hash(
    ids, token_map, multipliers, table_sizes, history, token_mask, pad_id, offsets, compressed, dead
):
    batch, length = ids.shape
    layers, n = multipliers.shape
    heads = table_sizes.shape[1] // (n - 1)
    out = torch.empty(layers, batch, length, (n - 1) * heads, dtype=torch.long, device=ids.device)
    block_t = min(64, next_power_of_2(length))
    grid = (triton.cdiv(length, block_t), batch, layers)
    _ngram_hash_kernel[grid](
        ids, ids.stride(0),
        history if history is not None else ids, history.stride(0) if history is not None else 0,
        token_mask if token_mask is not None else ids, token_mask.stride(0) if token_mask is not None else 0,
        token_map, dead if dead is not None else token_map, pad_id,
        multipliers, table_sizes, offsets if offsets is not None else table_sizes,
        out, batch, length,
        N=n, HEADS=heads, K_PAD=next_power_of_2((n - 1) * heads), BLOCK_T=block_t,
        MAP_IDS=not compressed, HAS_HISTORY=history is not None, HAS_MASK=token_mask is not None,
        HAS_OFFSETS=offsets is not None, HAS_DEAD=dead is not None,
    )
    return out


def _rows_contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def ngram_hash(
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
    """Row ids of every head of every Engram layer, `[L, B, T, (N-1) * H]` int64, in one launch.

    Args:
        ids: `[B, T]` raw token ids (compressed through `token_map`), or compressed ids when `compressed=True`.
        token_map: `[V]` int32/int64, raw id -> compressed id (values in `[0, V')`).
        multipliers: `[L, N]` int64, odd, at most `int64_max // V'` (what `EngramConfig` validates).
        table_sizes: `[L, (N-1) * H]` int64 head-table sizes, order 2 first.
        pad_id: raw token id read before the sequence starts and where `token_mask` is 0.
        history: `[B, N-1]` compressed ids before `ids` (decoding with a cache); pad ids when None.
        token_mask: `[B, T]`, 0 marks padding positions, which read the pad id.
        offsets: `[L, (N-1) * H]` int64 head offsets in each layer's flat table; when given, the ids returned
            are flat-table rows (`offset + row`), otherwise rows inside each head's own table.
        compressed: `ids` are already compressed ids.
        dead: `[V]` uint8, 1 at dead raw ids (DeepSeek-V4.1's image placeholders). In the window of position t,
            x'_{t-k} reads the pad id when any of x_{t-k} .. x_t is dead. Compressed `ids` and `history` mark dead
            positions with -1.
    """
    layers, n = multipliers.shape
    if ids.ndim != 2 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ngram_hash: ids must be an integer tensor [B, T], got {ids.dtype} {tuple(ids.shape)}")
    if n < 2 or table_sizes.ndim != 2 or table_sizes.shape[0] != layers or table_sizes.shape[1] % (n - 1):
        raise ValueError(
            f"ngram_hash: table_sizes {tuple(table_sizes.shape)} must be [L={layers}, (N-1) * heads] for "
            f"multipliers {tuple(multipliers.shape)} = [L, N], N >= 2"
        )
    if multipliers.dtype != torch.long or table_sizes.dtype != torch.long:
        raise ValueError("ngram_hash: multipliers and table_sizes must be int64")
    if history is not None and tuple(history.shape) != (ids.shape[0], n - 1):
        raise ValueError(f"ngram_hash: history has shape {tuple(history.shape)}, expected ({ids.shape[0]}, {n - 1})")
    if token_mask is not None and token_mask.shape != ids.shape:
        raise ValueError(f"ngram_hash: token_mask has shape {tuple(token_mask.shape)}, ids {tuple(ids.shape)}")
    if offsets is not None and offsets.shape != table_sizes.shape:
        raise ValueError(
            f"ngram_hash: offsets has shape {tuple(offsets.shape)}, table_sizes {tuple(table_sizes.shape)}"
        )
    if dead is not None and (dead.shape != token_map.shape or dead.dtype != torch.uint8):
        raise ValueError(f"ngram_hash: dead must be uint8 {tuple(token_map.shape)}, got {dead.dtype} {tuple(dead.shape)}")
    if token_mask is not None and token_mask.dtype == torch.bool:
        token_mask = token_mask.to(torch.int8)
    tensors = [t for t in (ids, token_map, multipliers, table_sizes, history, token_mask, offsets, dead) if t is not None]
    check_runnable("ngram_hash", *tensors)
    return _launch_ngram_hash(
        _rows_contiguous(ids), token_map.contiguous(), multipliers.contiguous(), table_sizes.contiguous(),
        _rows_contiguous(history), _rows_contiguous(token_mask), int(pad_id),
        offsets.contiguous() if offsets is not None else None, compressed,
        dead.contiguous() if dead is not None else None,
    )


__all__ = ["ngram_hash"]
