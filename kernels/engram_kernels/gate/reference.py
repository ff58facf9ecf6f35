"""Readable torch reference of the Engram gate, everything in fp32; autograd gives the reference gradients."""

import math

import torch


def fused_gate_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_weight: torch.Tensor,
    key_weight: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Same arguments and result as `fused_gate`: `[..., M, D]` in `value`'s dtype."""

    def rms_norm(x, weight):
        return weight.float() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    q, k, v = query.float(), key.float(), value.float()
    score = (rms_norm(q, query_weight) * rms_norm(k, key_weight)).sum(-1, keepdim=True) / math.sqrt(q.shape[-1])
    alpha = torch.sigmoid(score.sign() * score.abs().clamp_min(1e-6).sqrt())
    return (alpha * v.unsqueeze(-2)).to(value.dtype)


__all__ = ["fused_gate_reference"]
