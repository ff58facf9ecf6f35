"""Multi-head row gather from an Engram flat table, and its backward as fp32 row gradients.

Forward: `rows[..., j * D:(j + 1) * D] = weight[offsets[j] + hash_ids[..., j]]`. Backward: the gradient of every
distinct table row that was read, summed in fp32 (`row_gradients`), either with atomics or, deterministically,
by one program per row that adds its contributions in position order.
"""

import torch
import triton
import triton.language as tl

from ..utils import INTERPRETED, check_runnable, next_power_of_2, num_warps_for


@triton.jit
def _pair_tile(ids_ptr, offsets_ptr, pairs, K, D, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's [BLOCK_P] (position, head) pairs p, [BLOCK_D] columns d, the flat-table row of each pair (its
    head's offset plus its head-local row id) and the in-range mask."""
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    p_ok = p < pairs
    row = tl.load(ids_ptr + p, mask=p_ok, other=0) + tl.load(offsets_ptr + p % K, mask=p_ok, other=0)
    return p, d, row, p_ok[:, None] & (d < D)[None, :]


@triton.jit
def _gather_rows_kernel(
    weight_ptr,  # [R, D]
    weight_stride,
    ids_ptr,  # [P] head-local row ids, P = tokens * K, heads fastest
    offsets_ptr,  # [K] int64
    out_ptr,  # [P, D]
    pairs,
    K,
    D,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    p, d, row, mask = _pair_tile(ids_ptr, offsets_ptr, pairs, K, D, BLOCK_P, BLOCK_D)
    values = tl.load(weight_ptr + row[:, None] * weight_stride + d[None, :], mask=mask)
    tl.store(out_ptr + p[:, None] * D + d[None, :], values, mask=mask)


@triton.jit
def _gather_fp8_rows_kernel(
    values_ptr,  # [R, D] uint8: e4m3 bits
    scales_ptr,  # [R, D / 32] uint8: ue8m0 exponents
    ids_ptr,  # [P] head-local row ids, heads fastest
    offsets_ptr,  # [K] int64
    out_ptr,  # [P, D] bf16
    pairs,
    K,
    D,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    p, d, row, mask = _pair_tile(ids_ptr, offsets_ptr, pairs, K, D, BLOCK_P, BLOCK_D)
    bits = tl.load(values_ptr + row[:, None] * D + d[None, :], mask=mask, other=0).to(tl.int32)
    byte = tl.load(scales_ptr + row[:, None] * (D // 32) + (d // 32)[None, :], mask=mask, other=127).to(tl.int32)
    # e4m3fn -> fp32 from its bits (exact): normal numbers rebias the exponent (7 -> 127), subnormals are m * 2**-9.
    sign = tl.where((bits & 0x80) != 0, -1.0, 1.0)
    exponent = (bits >> 3) & 0xF
    mantissa = bits & 0x7
    normal = ((exponent + 120) << 23 | mantissa << 20).to(tl.float32, bitcast=True)
    magnitude = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)
    magnitude = tl.where((exponent == 15) & (mantissa == 7), float("nan"), magnitude)
    scale = (byte << 23).to(tl.float32, bitcast=True)  # 2 ** (byte - 127), byte in [1, 254]
    tl.store(out_ptr + p[:, None] * D + d[None, :], (sign * magnitude * scale).to(tl.bfloat16), mask=mask)


@triton.jit
def _row_grads_atomic_kernel(
    grad_ptr,  # [P, D] gradient of the gathered rows
    slot_ptr,  # [P] int64: index of each pair's row among the unique rows
    out_ptr,  # [U, D] fp32, zero-initialised
    pairs,
    D,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    p_ok = p < pairs
    mask = p_ok[:, None] & (d < D)[None, :]
    slot = tl.load(slot_ptr + p, mask=p_ok, other=0)
    grad = tl.load(grad_ptr + p[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr + slot[:, None] * D + d[None, :], grad, mask=mask)


@triton.jit
def _row_grads_ordered_kernel(
    grad_ptr,  # [P, D] gradient of the gathered rows
    order_ptr,  # [P] int64: pair indices sorted by row, positions ascending within a row
    start_ptr,  # [U] int64: first entry of each unique row in `order`
    count_ptr,  # [U] int64: entries of each unique row
    out_ptr,  # [U, D] fp32
    D,
    BLOCK_D: tl.constexpr,
    CHUNK: tl.constexpr,
):
    u = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    start = tl.load(start_ptr + u)
    count = tl.load(count_ptr + u)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    # Contributions are added one at a time in position order (no atomics: bit-identical run to run); the
    # unrolled chunk only lets a GPU issue CHUNK loads at once for rows read many times.
    for first in range(0, count, CHUNK):
        for j in tl.static_range(CHUNK):
            valid = first + j < count
            p = tl.load(order_ptr + start + first + j, mask=valid, other=0)
            width = tl.where(valid, D, 0)  # not `d_ok & valid`: the interpreter gives that an integer dtype
            acc += tl.load(grad_ptr + p * D + d, mask=d < width, other=0.0).to(tl.float32)
    tl.store(out_ptr + u * D + d, acc, mask=d_ok)


def _blocks(dim: int) -> tuple[int, int]:
    block_d = min(128, next_power_of_2(dim))
    return max(1, 4096 // block_d), block_d


def _launch_gather(weight: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    heads, dim = offsets.numel(), weight.shape[1]
    flat_ids = ids.reshape(-1)
    out = torch.empty(flat_ids.numel(), dim, dtype=weight.dtype, device=weight.device)
    block_p, block_d = _blocks(dim)
    block_p = min(block_p, next_power_of_2(max(1, flat_ids.numel())))
    grid = (triton.cdiv(flat_ids.numel(), block_p), triton.cdiv(dim, block_d))
    _gather_rows_kernel[grid](
        weight, weight.stride(0), flat_ids, offsets, out, flat_ids.numel(), heads, dim,
        BLOCK_P=block_p, BLOCK_D=block_d, num_warps=num_warps_for(block_p * block_d),
    )
    return out


def _launch_gather_fp8(values, scales, ids, offsets) -> torch.Tensor:
    heads, dim = offsets.numel(), values.shape[1]
    flat_ids = ids.reshape(-1)
    out = torch.empty(flat_ids.numel(), dim, dtype=torch.bfloat16, device=values.device)
    block_p, block_d = _blocks(dim)
    block_p = min(block_p, next_power_of_2(max(1, flat_ids.numel())))
    grid = (triton.cdiv(flat_ids.numel(), block_p), triton.cdiv(dim, block_d))
    _gather_fp8_rows_kernel[grid](
        values.view(torch.uint8), scales, flat_ids, offsets, out, flat_ids.numel(), heads, dim,
        BLOCK_P=block_p, BLOCK_D=block_d, num_warps=num_warps_for(block_p * block_d),
    )
    return out


def _launch_row_grads(
    grad_rows: torch.Tensor, rows: torch.Tensor, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique rows [U], fp32 gradients [U, D]) for the flat-table row of every pair, `rows` [P]."""
    dim = grad_rows.shape[-1]
    unique, slot, counts = torch.unique(rows, sorted=True, return_inverse=True, return_counts=True)
    out = torch.zeros(unique.numel(), dim, dtype=torch.float32, device=grad_rows.device)
    block_p, block_d = _blocks(dim)
    if deterministic:
        order = torch.argsort(slot, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        grid = (unique.numel(), triton.cdiv(dim, block_d))
        _row_grads_ordered_kernel[grid](
            grad_rows, order, starts, counts, out, dim, BLOCK_D=block_d, CHUNK=1 if INTERPRETED else 8
        )
    else:
        block_p = min(block_p, next_power_of_2(max(1, rows.numel())))
        grid = (triton.cdiv(rows.numel(), block_p), triton.cdiv(dim, block_d))
        _row_grads_atomic_kernel[grid](
            grad_rows, slot, out, rows.numel(), dim,
            BLOCK_P=block_p, BLOCK_D=block_d, num_warps=num_warps_for(block_p * block_d),
        )
    return unique, out


class GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, hash_ids, offsets, deterministic, sparse_grad):
        ctx.save_for_backward(hash_ids, offsets)
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        ctx.deterministic, ctx.sparse_grad = deterministic, sparse_grad
        rows = _launch_gather(weight, hash_ids, offsets)
        return rows.view(*hash_ids.shape[:-1], hash_ids.shape[-1] * weight.shape[1])

    @staticmethod
    def backward(ctx, grad_rows):
        hash_ids, offsets = ctx.saved_tensors
        dim = ctx.weight_shape[1]
        grad_rows = grad_rows.reshape(-1, dim).contiguous()
        unique, row_grads = _launch_row_grads(grad_rows, (hash_ids + offsets).reshape(-1), ctx.deterministic)
        row_grads = row_grads.to(ctx.weight_dtype)
        if ctx.sparse_grad:
            grad_weight = torch.sparse_coo_tensor(
                unique[None], row_grads, ctx.weight_shape, is_coalesced=True, check_invariants=False
            )
        else:
            # index_put_, not index_copy_: CUDA index_copy_ refuses torch.use_deterministic_algorithms(True)
            grad_weight = row_grads.new_zeros(ctx.weight_shape).index_put_((unique,), row_grads)
        return grad_weight, None, None, None, None


def _check_gather_args(name, weight, hash_ids, offsets):
    if weight.ndim != 2:
        raise ValueError(f"{name}: weight must be a flat table [rows, head_dim], got {tuple(weight.shape)}")
    if hash_ids.dtype != torch.long or hash_ids.ndim < 1:
        raise ValueError(f"{name}: hash_ids must be int64 [..., heads], got {hash_ids.dtype} {tuple(hash_ids.shape)}")
    if offsets.dtype != torch.long or offsets.shape != hash_ids.shape[-1:]:
        raise ValueError(
            f"{name}: offsets must be int64 [heads={hash_ids.shape[-1]}], got {offsets.dtype} {tuple(offsets.shape)}"
        )


def gather_rows(
    weight: torch.Tensor,
    hash_ids: torch.LongTensor,
    offsets: torch.LongTensor,
    *,
    deterministic: bool | None = None,
    sparse_grad: bool = False,
) -> torch.Tensor:
    """Memory rows `[..., K * D]` of head-local row ids `hash_ids [..., K]` from the flat table `weight [R, D]`.

    Head j reads row `offsets[j] + hash_ids[..., j]` (ids must lie inside their head table, as the hash makes
    them). Differentiable in `weight`: the backward sums each distinct row's gradients in fp32 and returns a dense
    gradient like `F.embedding` (or a coalesced sparse one with `sparse_grad=True`). `deterministic` (default:
    `torch.are_deterministic_algorithms_enabled()`) sums without atomics, bit-identical run to run.
    """
    _check_gather_args("gather_rows", weight, hash_ids, offsets)
    check_runnable("gather_rows", weight, hash_ids, offsets)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    return GatherRows.apply(weight, hash_ids.contiguous(), offsets.contiguous(), deterministic, sparse_grad)


def gather_fp8_rows(
    values: torch.Tensor, scales: torch.Tensor, hash_ids: torch.LongTensor, offsets: torch.LongTensor
) -> torch.Tensor:
    """Dequantised memory rows `[..., K * D]` bf16 from an FP8 flat table (DeepSeek-V4.1's layout): e4m3
    `values [R, D]` and ue8m0 `scales [R, D / 32]` uint8, row = float(e4m3) * 2 ** (byte - 127), exact in bf16.

    Reads only the value and scale bytes of the gathered rows (D + D / 32 bytes per row) and dequantises in
    registers. Inference only: FP8 tables are not differentiable.
    """
    _check_gather_args("gather_fp8_rows", values, hash_ids, offsets)
    if values.dtype != torch.float8_e4m3fn:
        raise ValueError(f"gather_fp8_rows: values must be float8_e4m3fn, got {values.dtype}")
    if values.shape[1] % 32 or scales.dtype != torch.uint8 or tuple(scales.shape) != (values.shape[0], values.shape[1] // 32):
        raise ValueError(
            f"gather_fp8_rows: scales {scales.dtype} {tuple(scales.shape)} must be uint8 [R, D / 32] for values "
            f"{tuple(values.shape)} (D a multiple of 32)"
        )
    check_runnable("gather_fp8_rows", values, scales, hash_ids, offsets)
    rows = _launch_gather_fp8(values.contiguous(), scales.contiguous(), hash_ids.contiguous(), offsets.contiguous())
    return rows.view(*hash_ids.shape[:-1], hash_ids.shape[-1] * values.shape[1])


def row_gradients(
    grad_rows: torch.Tensor,
    hash_ids: torch.LongTensor,
    offsets: torch.LongTensor,
    *,
    deterministic: bool | None = None,
) -> tuple[torch.LongTensor, torch.Tensor]:
    """Row-wise gradient of the flat table: `(rows [U] sorted flat-table rows, grads [U, D] fp32)`.

    `grad_rows [..., K * D]` is the gradient of `gather_rows(weight, hash_ids, offsets)`; contributions of the same
    row are summed in fp32. For sparse / row-wise optimizer updates that must not touch the whole table.
    """
    _check_gather_args("row_gradients", grad_rows.new_empty(0, 1), hash_ids, offsets)
    check_runnable("row_gradients", grad_rows, hash_ids, offsets)
    heads = hash_ids.shape[-1]
    if grad_rows.shape[:-1] != hash_ids.shape[:-1] or grad_rows.shape[-1] % heads:
        raise ValueError(
            f"row_gradients: grad_rows {tuple(grad_rows.shape)} does not match hash_ids {tuple(hash_ids.shape)}"
        )
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    rows = (hash_ids + offsets).reshape(-1)
    return _launch_row_grads(grad_rows.reshape(rows.numel(), -1).contiguous(), rows, deterministic)


__all__ = ["gather_fp8_rows", "gather_rows", "row_gradients"]
