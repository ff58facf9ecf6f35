"""Fused Engram context-aware gate, forward and backward, for all residual branches at once.

Per token and branch m: a = RMSNorm_q(h_m) . RMSNorm_k(k_m) / sqrt(D), alpha = sigmoid(sign(a) sqrt(max(|a|, 1e-6))),
out_m = alpha v. All arithmetic in fp32; see README.md for the backward.
"""

import math

import torch
import triton
import triton.language as tl

from ..utils import check_runnable, next_power_of_2, persistent_programs


@triton.jit
def _load_branch(q_ptr, q_stride_t, q_stride_m, k_ptr, k_stride_t, k_stride_m, wq_ptr, wk_ptr, t, m, d, mask, D):
    """q, k [BLOCK_T, D_PAD] of branch m for the tokens `t` and the branch's norm weights [1, D_PAD], in fp32."""
    q = tl.load(q_ptr + t[:, None] * q_stride_t + m * q_stride_m + d[None, :], mask=mask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + t[:, None] * k_stride_t + m * k_stride_m + d[None, :], mask=mask, other=0.0).to(tl.float32)
    wq = tl.load(wq_ptr + m * D + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
    wk = tl.load(wk_ptr + m * D + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
    return q, k, wq, wk


@triton.jit
def _gate_scores(q, k, wq, wk, D, eps, scale):
    """Normalised q, k (before their weights), 1/rms of each, the score a and the gate alpha: [BLOCK_T]."""
    q_rstd = tl.rsqrt(tl.sum(q * q, axis=1) / D + eps)
    k_rstd = tl.rsqrt(tl.sum(k * k, axis=1) / D + eps)
    q_hat = q * q_rstd[:, None]
    k_hat = k * k_rstd[:, None]
    score = tl.sum((q_hat * wq) * (k_hat * wk), axis=1) * scale
    root = tl.sqrt(tl.maximum(tl.abs(score), 1e-6))
    alpha = tl.sigmoid(tl.where(score > 0, root, tl.where(score < 0, -root, 0.0)))
    return q_hat, k_hat, q_rstd, k_rstd, score, root, alpha


@triton.jit
def _gate_fwd_kernel(
    q_ptr, q_stride_t, q_stride_m,  # [n_tokens, M, D] query hidden states (before the norm)
    k_ptr, k_stride_t, k_stride_m,  # [n_tokens, M, D] projected keys (before the norm)
    v_ptr, v_stride_t,  # [n_tokens, D] shared value
    wq_ptr, wk_ptr,  # [M, D] norm weights
    out_ptr,  # [n_tokens, M, D]
    n_tokens, M, D, eps, scale,
    BLOCK_T: tl.constexpr, D_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, D_PAD)
    mask = (t < n_tokens)[:, None] & (d < D)[None, :]
    v = tl.load(v_ptr + t[:, None] * v_stride_t + d[None, :], mask=mask, other=0.0).to(tl.float32)
    for m in range(M):  # one branch at a time: [BLOCK_T, D_PAD] tiles keep the registers low for large D
        q, k, wq, wk = _load_branch(q_ptr, q_stride_t, q_stride_m, k_ptr, k_stride_t, k_stride_m, wq_ptr, wk_ptr,
                                    t, m, d, mask, D)
        _, _, _, _, _, _, alpha = _gate_scores(q, k, wq, wk, D, eps, scale)
        out = alpha[:, None] * v
        tl.store(out_ptr + (t[:, None] * M + m) * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd_kernel(
    q_ptr, q_stride_t, q_stride_m,
    k_ptr, k_stride_t, k_stride_m,
    v_ptr, v_stride_t,
    wq_ptr, wk_ptr,
    grad_ptr,  # [n_tokens, M, D] gradient of the output, contiguous
    dq_ptr, dk_ptr,  # [n_tokens, M, D]
    dv_ptr,  # [n_tokens, D]
    dwq_ptr, dwk_ptr,  # [programs, M, D] fp32 partial sums of the norm-weight gradients, zero-initialised
    n_tokens, M, D, eps, scale,
    BLOCK_T: tl.constexpr, D_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    d = tl.arange(0, D_PAD)
    for block in range(pid, tl.cdiv(n_tokens, BLOCK_T), tl.num_programs(0)):
        t = (block * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # block * BLOCK_T < n_tokens + BLOCK_T
        mask = (t < n_tokens)[:, None] & (d < D)[None, :]
        v = tl.load(v_ptr + t[:, None] * v_stride_t + d[None, :], mask=mask, other=0.0).to(tl.float32)
        dv = tl.zeros([BLOCK_T, D_PAD], dtype=tl.float32)
        for m in range(M):
            q, k, wq, wk = _load_branch(q_ptr, q_stride_t, q_stride_m, k_ptr, k_stride_t, k_stride_m, wq_ptr, wk_ptr,
                                        t, m, d, mask, D)
            q_hat, k_hat, q_rstd, k_rstd, score, root, alpha = _gate_scores(q, k, wq, wk, D, eps, scale)
            offsets = (t[:, None] * M + m) * D + d[None, :]
            grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)

            dv += grad * alpha[:, None]
            d_alpha = tl.sum(grad * v, axis=1)
            # d sqrt(max(|a|, 1e-6)) sign(a) / da = 1 / (2 sqrt|a|) where |a| >= 1e-6, else 0 (as torch's clamp_min)
            d_score = tl.where(tl.abs(score) >= 1e-6, d_alpha * alpha * (1.0 - alpha) * 0.5 / root, 0.0) * scale
            d_qn = d_score[:, None] * (k_hat * wk)  # gradient of the weighted, normalised query
            d_kn = d_score[:, None] * (q_hat * wq)
            # This program's own partial row: read-modify-write in program order, no atomics (deterministic).
            partial = (pid.to(tl.int64) * M + m) * D + d
            dwq = tl.load(dwq_ptr + partial, mask=d < D) + tl.sum(d_qn * q_hat, axis=0)
            dwk = tl.load(dwk_ptr + partial, mask=d < D) + tl.sum(d_kn * k_hat, axis=0)
            tl.store(dwq_ptr + partial, dwq, mask=d < D)
            tl.store(dwk_ptr + partial, dwk, mask=d < D)
            d_qhat = d_qn * wq
            d_khat = d_kn * wk
            dq = q_rstd[:, None] * (d_qhat - q_hat * (tl.sum(d_qhat * q_hat, axis=1) / D)[:, None])
            dk = k_rstd[:, None] * (d_khat - k_hat * (tl.sum(d_khat * k_hat, axis=1) / D)[:, None])
            tl.store(dq_ptr + offsets, dq.to(dq_ptr.dtype.element_ty), mask=mask)
            tl.store(dk_ptr + offsets, dk.to(dk_ptr.dtype.element_ty), mask=mask)
        tl.store(dv_ptr + t[:, None] * D + d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=mask)


def _gate_blocks(dim: int) -> tuple[int, int, int]:
    """(BLOCK_T, D_PAD, num_warps): [BLOCK_T, D_PAD] tiles of about 2048 values, about 8 per thread."""
    d_pad = next_power_of_2(dim)
    block_t = max(1, min(16, 2048 // d_pad))
    return block_t, d_pad, max(4, min(16, block_t * d_pad // 256))


def _launch_gate_forward(query, key, value, query_weight, key_weight, eps):
    n_tokens, branches, dim = query.shape
    out = torch.empty(n_tokens, branches, dim, dtype=value.dtype, device=value.device)
    block_t, d_pad, warps = _gate_blocks(dim)
    _gate_fwd_kernel[(triton.cdiv(n_tokens, block_t),)](
        query, query.stride(0), query.stride(1), key, key.stride(0), key.stride(1), value, value.stride(0),
        query_weight, key_weight, out, n_tokens, branches, dim, eps, 1.0 / math.sqrt(dim),
        BLOCK_T=block_t, D_PAD=d_pad, num_warps=warps,
    )
    return out


def _launch_gate_backward(grad, query, key, value, query_weight, key_weight, eps):
    n_tokens, branches, dim = query.shape
    block_t, d_pad, warps = _gate_blocks(dim)
    programs = persistent_programs(triton.cdiv(n_tokens, block_t), query.device)
    dq = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    dk = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    dv = torch.empty(n_tokens, dim, dtype=value.dtype, device=value.device)
    dwq = torch.zeros(programs, branches, dim, dtype=torch.float32, device=query.device)
    dwk = torch.zeros_like(dwq)
    _gate_bwd_kernel[(programs,)](
        query, query.stride(0), query.stride(1), key, key.stride(0), key.stride(1), value, value.stride(0),
        query_weight, key_weight, grad, dq, dk, dv, dwq, dwk, n_tokens, branches, dim, eps, 1.0 / math.sqrt(dim),
        BLOCK_T=block_t, D_PAD=d_pad, num_warps=warps,
    )
    return dq, dk, dv, dwq.sum(0).to(query_weight.dtype), dwk.sum(0).to(key_weight.dtype)


class FusedGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, query_weight, key_weight, eps):
        ctx.save_for_backward(query, key, value, query_weight, key_weight)
        ctx.eps = eps
        return _launch_gate_forward(query, key, value, query_weight, key_weight, eps)

    @staticmethod
    def backward(ctx, grad):
        query, key, value, query_weight, key_weight = ctx.saved_tensors
        dq, dk, dv, dwq, dwk = _launch_gate_backward(
            grad.contiguous(), query, key, value, query_weight, key_weight, ctx.eps
        )
        return dq, dk, dv, dwq, dwk, None


def _token_rows(x: torch.Tensor, trailing: int) -> torch.Tensor:
    """`x` as [tokens, *last `trailing` dims] with a unit stride on the last dim; a view whenever possible."""
    x = x.reshape(-1, *x.shape[x.ndim - trailing :])
    return x if x.stride(-1) == 1 else x.contiguous()


def fused_gate(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_weight: torch.Tensor,
    key_weight: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Gated values `[..., M, D]`: `sigmoid(signed_sqrt(RMSNorm(query) . RMSNorm(key) / sqrt(D))) * value`.

    Args:
        query: `[..., M, D]` hidden states of the M residual branches (before the query norm).
        key: `[..., M, D]` projected memory keys of every branch (before the key norm); may be a view into a
            fused key/value projection output.
        value: `[..., D]` shared projected memory value.
        query_weight, key_weight: `[M, D]` weights of the two per-branch RMSNorms (`BranchRMSNorm.weight`).
        eps: RMSNorm epsilon.
    Differentiable in all five tensors; weight gradients are summed in fp32 without atomics.
    """
    branches, dim = query.shape[-2:]
    if key.shape != query.shape or value.shape != (*query.shape[:-2], dim):
        raise ValueError(
            f"fused_gate: query {tuple(query.shape)} and key {tuple(key.shape)} must be [..., M, D] and value "
            f"{tuple(value.shape)} [..., D]"
        )
    if query_weight.shape != (branches, dim) or key_weight.shape != (branches, dim):
        raise ValueError(
            f"fused_gate: norm weights {tuple(query_weight.shape)}, {tuple(key_weight.shape)} must be "
            f"[M={branches}, D={dim}]"
        )
    check_runnable("fused_gate", query, key, value, query_weight, key_weight)
    out = FusedGate.apply(
        _token_rows(query, 2), _token_rows(key, 2), _token_rows(value, 1),
        query_weight.contiguous(), key_weight.contiguous(), float(eps),
    )
    return out.view(query.shape)


__all__ = ["fused_gate"]
