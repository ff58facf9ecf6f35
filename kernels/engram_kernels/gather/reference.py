"""Readable torch reference of the multi-head row gather and its fp32 row gradients."""

import torch
from torch.nn import functional as F


def gather_rows_reference(weight: torch.Tensor, hash_ids: torch.LongTensor, offsets: torch.LongTensor) -> torch.Tensor:
    """`[..., K * D]`: head j reads `weight[offsets[j] + hash_ids[..., j]]` (what `EngramTable` does)."""
    return F.embedding(hash_ids + offsets, weight).flatten(-2)


def gather_fp8_rows_reference(
    values: torch.Tensor, scales: torch.Tensor, hash_ids: torch.LongTensor, offsets: torch.LongTensor
) -> torch.Tensor:
    """`[..., K * D]` bf16: FP8 rows `float(values[r]) * 2 ** (scales[r] - 127)`, each scale byte over 32 values."""
    rows = hash_ids + offsets
    decoded = F.embedding(rows, values.view(torch.uint8)).view(torch.float8_e4m3fn).float()
    exponents = F.embedding(rows, scales).int() - 127
    scaled = torch.ldexp(decoded, exponents.repeat_interleave(32, dim=-1))
    return scaled.to(torch.bfloat16).flatten(-2)


def row_gradients_reference(
    grad_rows: torch.Tensor, hash_ids: torch.LongTensor, offsets: torch.LongTensor
) -> tuple[torch.LongTensor, torch.Tensor]:
    """`(rows [U] sorted, grads [U, D] fp32)`: every distinct row's gradient summed in fp32."""
    rows = (hash_ids + offsets).reshape(-1)
    unique, slot = torch.unique(rows, sorted=True, return_inverse=True)
    grads = grad_rows.reshape(rows.numel(), -1).float()
    return unique, torch.zeros(unique.numel(), grads.shape[1], device=grads.device).index_add_(0, slot, grads)


def row_gradients_in_order(
    grad_rows: torch.Tensor, hash_ids: torch.LongTensor, offsets: torch.LongTensor
) -> tuple[torch.LongTensor, torch.Tensor]:
    """As `row_gradients_reference`, but each row adds its contributions one at a time in position order.

    The deterministic kernel's summation order: fp32 additions in the same order give the same bits.
    """
    rows = (hash_ids + offsets).reshape(-1)
    unique, slot, counts = torch.unique(rows, sorted=True, return_inverse=True, return_counts=True)
    grads = grad_rows.reshape(rows.numel(), -1).float()
    order = torch.argsort(slot, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    out = torch.zeros(unique.numel(), grads.shape[1], device=grads.device)
    for i in range(int(counts.max()) if counts.numel() else 0):
        has = counts > i
        out[has] = out[has] + grads[order[starts[has] + i]]
    return unique, out


__all__ = ["gather_fp8_rows_reference", "gather_rows_reference", "row_gradients_reference", "row_gradients_in_order"]
