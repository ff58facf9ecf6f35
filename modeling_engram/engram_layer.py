"""The Engram layer: memory rows -> per-branch context-aware gating -> short causal conv (paper section 2.3-2.4)."""

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers.cache_utils import Cache

from .configuration_engram import EngramConfig
from .memory import EngramTable

CONV_STATE = 0  # cache conv-state slot of an Engram layer holding the short-conv inputs
TOKEN_STATE = 1  # cache conv-state slot holding the last max_ngram_size - 1 compressed token ids


class BranchRMSNorm(nn.Module):
    """RMSNorm over the last dim of [..., branches, dim], with one weight row per residual branch."""

    def __init__(self, branches: int, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(branches, dim))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def signed_sqrt_gate(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """alpha = sigmoid(sign(a) * sqrt(max(|a|, 1e-6))), a = q . k / sqrt(d): [..., branches, 1]."""
    scores = (query * key).sum(dim=-1, keepdim=True) / math.sqrt(query.shape[-1])
    return torch.sigmoid(scores.abs().clamp_min(1e-6).sqrt() * scores.sign())


class EngramGate(nn.Module):
    """The context-aware gate as a module (no parameters), so forward hooks can read alpha [B, T, M, 1]
    (`visualize.gate_heatmap` does)."""

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        return signed_sqrt_gate(query, key)


class EngramShortConv(nn.Module):
    """Y = SiLU(causal depthwise Conv1D(x)), kernel `engram_kernel_size`, dilation `max_ngram_size`.

    Zero-initialised, so a fresh Engram layer is the identity path plus its gated values. With a cache, the last
    (kernel - 1) * dilation inputs live in the layer's cache conv state, so decoding step by step equals one pass.
    """

    def __init__(self, config: EngramConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        channels = config.hc_mult * config.hidden_size
        self.dilation = config.max_ngram_size
        self.state_len = (config.engram_kernel_size - 1) * self.dilation
        self.weight = nn.Parameter(torch.zeros(channels, 1, config.engram_kernel_size))  # depthwise [C, 1, K]

    def forward(self, hidden_states: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """hidden_states [B, T, C] -> [B, T, C]."""
        length = hidden_states.shape[1]
        inputs = hidden_states.transpose(1, 2)
        if cache is not None:
            inputs = cache.update_conv_state(
                inputs, self.layer_idx, state_idx=CONV_STATE, conv_kernel_size=self.state_len
            )
        inputs = F.pad(inputs, (self.state_len, 0))[..., -(self.state_len + length) :]
        outputs = F.conv1d(inputs, self.weight, dilation=self.dilation, groups=self.weight.shape[0])
        return F.silu(outputs).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"channels={self.weight.shape[0]}, kernel_size={self.weight.shape[-1]}, dilation={self.dilation}"


class EngramKeyValue(nn.Module):
    """Shared value and per-branch keys of the memory rows in one matmul: `forward(rows [B, T, d_mem]) ->
    (value [B, T, D], keys [B, T, M * D])`, i.e. rows @ [W_V; W_K^(1); ..; W_K^(M)]^T.

    `value_proj` (W_V, shared by the branches) and `key_proj` (the keys of all branches, part of the gate) are
    ordinary `nn.Linear`s, so PEFT can wrap the gating keys alone (LoRA, LN-tuning); while both are plain, unhooked
    Linears their weights are concatenated into one matmul, otherwise each is called through its own forward.
    """

    def __init__(self, config: EngramConfig):
        super().__init__()
        self.value_proj = nn.Linear(config.engram_dim, config.hidden_size, bias=False)
        self.key_proj = nn.Linear(config.engram_dim, config.hc_mult * config.hidden_size, bias=False)

    def _fusable(self) -> bool:
        """Plain Linears nobody hooks (PEFT wrappers, Accelerate offload hooks and forward hooks need the calls)."""
        return all(
            type(proj) is nn.Linear and not hasattr(proj, "_hf_hook")
            and not proj._forward_hooks and not proj._forward_pre_hooks
            for proj in (self.value_proj, self.key_proj)
        )

    def forward(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._fusable():
            weight = torch.cat([self.value_proj.weight, self.key_proj.weight])
            value_and_keys = F.linear(rows.to(weight.dtype), weight)
            return value_and_keys.split([self.value_proj.out_features, self.key_proj.out_features], dim=-1)
        rows = rows.to(self.value_proj.weight.dtype)
        return self.value_proj(rows), self.key_proj(rows)


class EngramLayer(nn.Module):
    """Engram at one decoder layer: `forward(hidden [B, T, hc * D], hash_ids [B, T, heads]) -> [B, T, hc * D]`.

    Per branch m: k_m = W_K^(m) e, v = W_V e (shared), alpha_m = gate(RMSNorm(h_m), RMSNorm(k_m)), u_m = alpha_m v;
    Y = SiLU(Conv(RMSNorm(U))) + U. The value and the keys of all branches are one matmul (`kv_proj`).
    """

    # Submodules that compute only the gate alpha, by role: what gating-only fine-tuning trains (gating_peft.py).
    gating_projections = ("kv_proj.key_proj",)
    gating_norms = ("query_norm", "key_norm")

    def __init__(self, config: EngramConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hc_mult = config.hc_mult
        self.hidden_size = config.hidden_size
        engram_index = config.engram_layer_ids.index(layer_idx)
        self.table = EngramTable(
            config.engram_table_sizes[engram_index],
            config.n_embed_per_ngram // config.n_head_per_ngram,
            storage=config.engram_storage,
            cache_rows=config.engram_cache_rows,
        )
        self.kv_proj = EngramKeyValue(config)
        self.query_norm = BranchRMSNorm(config.hc_mult, config.hidden_size, eps=config.rms_norm_eps)
        self.key_norm = BranchRMSNorm(config.hc_mult, config.hidden_size, eps=config.rms_norm_eps)
        self.conv_norm = BranchRMSNorm(config.hc_mult, config.hidden_size, eps=config.rms_norm_eps)
        self.short_conv = EngramShortConv(config, layer_idx)
        self.gate = EngramGate()

    def forward(
        self,
        hidden_states: torch.Tensor,
        hash_ids: torch.LongTensor,
        cache: Cache | None = None,
        token_mask: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`rows` [B, T, d_mem]: memory rows fetched ahead (prefetch); gathered here from `hash_ids` otherwise."""
        branches = (self.hc_mult, self.hidden_size)
        value, keys = self.kv_proj(self.table(hash_ids) if rows is None else rows)
        key = self.key_norm(keys.unflatten(-1, branches))
        query = self.query_norm(hidden_states.unflatten(-1, branches))
        gate = self.gate(query, key)
        values = (gate * value.unsqueeze(-2)).flatten(-2)
        conv_inputs = self.conv_norm(values.unflatten(-1, branches)).flatten(-2)
        if token_mask is not None:  # padding positions feed zeros to the conv, as positions before the start do
            conv_inputs = conv_inputs * token_mask.unsqueeze(-1).to(conv_inputs.dtype)
        return values + self.short_conv(conv_inputs, cache)


__all__ = ["EngramLayer", "EngramGate", "EngramKeyValue", "EngramShortConv", "BranchRMSNorm", "signed_sqrt_gate"]
