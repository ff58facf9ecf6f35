"""Manifold-Constrained Hyper-Connections (mHC; Xie et al. 2025, "mHC: Manifold-Constrained Hyper-Connections").

The residual stream holds M = `hc_mult` branches, `[B, T, M * D]`. Around each sublayer F (attention, FFN), with
x = [x_1 .. x_M] the branches of one token and x' = RMSNorm(vec(x)) (no weight: the projection absorbs it):

    pre  = sigmoid(alpha_pre  * x' phi_pre  + b_pre)                      [M]      M -> 1
    post = 2 sigmoid(alpha_post * x' phi_post + b_post)                   [M]      1 -> M
    res  = SinkhornKnopp(alpha_res * mat(x' phi_res) + b_res)             [M, M]   M -> M, doubly stochastic
    x_i <- sum_j res[i, j] x_j + post_i * F(sum_j pre_j x_j)

phi (one `proj` matrix for all three) is the input-dependent part, b (`bias`) the static part, alpha (`scale`)
gates the input-dependent part. The mixing weights are computed in fp32. With M = 1 the model uses
`PlainResidual` instead, x <- x + F(x): no parameters, exactly the pre-norm residual.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

from .configuration_engram import EngramConfig

DYNAMIC_SCALE_INIT = 0.01  # alpha: the input-dependent mixing starts small, as in Hyper-Connections
RESIDUAL_DIAGONAL_INIT = 0.9  # res starts at 0.9 on the diagonal: each branch mostly keeps its own stream


def sinkhorn_knopp(logits: torch.Tensor, iterations: int) -> torch.Tensor:
    """Project exp(logits) [..., M, M] towards the doubly stochastic matrices.

    Starts from exp(logits) with its rows normalised (a softmax, which cannot overflow), then alternates column and
    row normalisation `iterations` times, as M <- T_r(T_c(M)) in the mHC paper: rows sum to 1 up to rounding,
    columns up to the Sinkhorn residual, which shrinks geometrically with `iterations`.
    """
    matrix = logits.softmax(dim=-1)
    tiny = torch.finfo(matrix.dtype).tiny  # an all-underflowed column stays 0 instead of NaN
    for _ in range(iterations):
        matrix = matrix / matrix.sum(dim=-2, keepdim=True).clamp_min(tiny)
        matrix = matrix / matrix.sum(dim=-1, keepdim=True).clamp_min(tiny)
    return matrix


def branch_rms(streams: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMSNorm of the flattened branches [..., M * D], in fp32."""
    streams = streams.float()
    return streams * torch.rsqrt(streams.pow(2).mean(-1, keepdim=True) + eps)


class PlainResidual(nn.Module):
    """x <- x + F(x): the hc_mult = 1 residual, with the same interface as `HyperConnection`."""

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return streams, None, None

    def add(self, streams: torch.Tensor, output: torch.Tensor, post: None, res: None) -> torch.Tensor:
        return streams + output


class HyperConnection(nn.Module):
    """mHC around one sublayer: `forward(streams [B, T, M*D]) -> (layer input [B, T, D], post, res)`, then
    `add(streams, layer output [B, T, D], post, res) -> streams [B, T, M*D]`.

    Parameters: `proj` (phi, [M*(M+2), M*D]: pre | post | res rows), `scale` (alpha_pre, alpha_post, alpha_res)
    and `bias` (b_pre | b_post | b_res, [M*(M+2)]).
    """

    def __init__(self, config: EngramConfig):
        super().__init__()
        if config.hc_mult < 2:
            raise ValueError(f"HyperConnection needs hc_mult >= 2 (got {config.hc_mult}); use PlainResidual for 1.")
        self.hc_mult = config.hc_mult
        self.hidden_size = config.hidden_size
        self.sinkhorn_iters = config.hc_sinkhorn_iters
        self.eps = config.rms_norm_eps
        mixes = self.hc_mult * (self.hc_mult + 2)
        # A bare parameter, not an nn.Linear: it is read inside this module's forward, where Accelerate's offload
        # hooks (which load a module's own tensors around its forward) make it available.
        self.proj = nn.Parameter(torch.empty(mixes, self.hc_mult * self.hidden_size))
        self.scale = nn.Parameter(torch.empty(3))
        self.bias = nn.Parameter(torch.empty(mixes))

    def static_bias(self) -> torch.Tensor:
        """Initial b: pre = 1/M each (the collapse starts as the branch mean), post = 1 (each branch receives the
        whole sublayer output), res = 0.9 on the diagonal and 0.1 / (M-1) elsewhere (already doubly stochastic)."""
        m = self.hc_mult
        pre = torch.full((m,), math.log(1 / (m - 1)))  # sigmoid(log(1/(M-1))) = 1/M
        post = torch.zeros(m)
        res = torch.zeros(m, m)
        res.fill_diagonal_(math.log(RESIDUAL_DIAGONAL_INIT * (m - 1) / (1 - RESIDUAL_DIAGONAL_INIT)))
        return torch.cat([pre, post, res.flatten()])

    def mixing(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pre [B, T, M], post [B, T, M], res [B, T, M, M] (fp32) from the branches [B, T, M*D]."""
        m = self.hc_mult
        sizes = [m, m, m * m]
        mixes = F.linear(branch_rms(streams, self.eps), self.proj.float()).split(sizes, dim=-1)
        scale_pre, scale_post, scale_res = self.scale.float().unbind(0)
        bias_pre, bias_post, bias_res = self.bias.float().split(sizes)
        pre = torch.sigmoid(scale_pre * mixes[0] + bias_pre)
        post = 2 * torch.sigmoid(scale_post * mixes[1] + bias_post)
        res = sinkhorn_knopp((scale_res * mixes[2] + bias_res).unflatten(-1, (m, m)), self.sinkhorn_iters)
        return pre, post, res

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pre, post, res = self.mixing(streams)
        branches = streams.unflatten(-1, (self.hc_mult, self.hidden_size))
        layer_input = (pre.to(streams.dtype).unsqueeze(-1) * branches).sum(-2)
        return layer_input, post, res

    def add(self, streams: torch.Tensor, output: torch.Tensor, post: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        branches = streams.unflatten(-1, (self.hc_mult, self.hidden_size))
        mixed = torch.matmul(res.to(streams.dtype), branches)  # mixed_i = sum_j res[i, j] x_j
        return (mixed + post.to(streams.dtype).unsqueeze(-1) * output.unsqueeze(-2)).flatten(-2)

    def extra_repr(self) -> str:
        return f"hc_mult={self.hc_mult}, hidden_size={self.hidden_size}, sinkhorn_iters={self.sinkhorn_iters}"


class HyperHead(nn.Module):
    """Final M -> 1 collapse before the last norm: sum_m w_m x_m, w = sigmoid(alpha x' phi + b), `[B, T, D]`."""

    def __init__(self, config: EngramConfig):
        super().__init__()
        self.hc_mult = config.hc_mult
        self.hidden_size = config.hidden_size
        self.eps = config.rms_norm_eps
        self.proj = nn.Parameter(torch.empty(self.hc_mult, self.hc_mult * self.hidden_size))  # see HyperConnection
        self.scale = nn.Parameter(torch.empty(1))
        self.bias = nn.Parameter(torch.empty(self.hc_mult))

    def static_bias(self) -> torch.Tensor:
        """Initial b: weights 1/M, so the head starts as the branch mean."""
        return torch.full((self.hc_mult,), math.log(1 / (self.hc_mult - 1)))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        mixes = F.linear(branch_rms(streams, self.eps), self.proj.float())
        weights = torch.sigmoid(mixes * self.scale.float() + self.bias.float())
        branches = streams.unflatten(-1, (self.hc_mult, self.hidden_size))
        return (weights.to(streams.dtype).unsqueeze(-1) * branches).sum(-2)


__all__ = ["HyperConnection", "HyperHead", "PlainResidual", "sinkhorn_knopp"]
