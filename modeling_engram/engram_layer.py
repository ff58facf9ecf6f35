"""The Engram layer: memory rows -> per-branch context-aware gating -> short causal conv (paper section 2.3-2.4)."""

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers.cache_utils import Cache

from .configuration_engram import EngramConfig
from .kernel_dispatch import load_kernels, use_triton
from .memory import EngramTable, rows_from_checkpoint

TOKEN_STATE = 0  # cache conv-state slot of an Engram layer holding the last max_ngram_size - 1 compressed token ids
CONV_STATE = 1  # cache conv-state slot holding the short-conv inputs (absent without a short conv)


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


def squared_norm(hidden_states: torch.Tensor) -> torch.Tensor:
    """sum(x**2) over the last dim in at least fp32, kept as a dim of 1, in one read (no squared copy)."""
    dtype = torch.promote_types(hidden_states.dtype, torch.float32)
    return torch.linalg.vector_norm(hidden_states, dim=-1, keepdim=True, dtype=dtype).square()


def branch_dots(products: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_d products[..., m, d] * weight[m, d] for products [..., M, D], weight [M, D]: [..., M, 1], as one
    matrix-vector product per branch (one read of `products`; the same formulation at every size, so a batch split
    across processes sums as the whole batch does)."""
    return torch.stack([products[..., m, :] @ weight[m] for m in range(weight.shape[0])], dim=-1).unsqueeze(-1)


def normed_gate(
    query: torch.Tensor,
    key: torch.Tensor,
    query_weight: torch.Tensor,
    key_weight: torch.Tensor,
    eps: float,
    overwrite_key: bool = False,
) -> torch.Tensor:
    """`signed_sqrt_gate(RMSNorm_q(query), RMSNorm_k(key))` for [..., M, D] inputs without materialising either
    norm: a = (sum_d w_q w_k q k) * sqrt(D) / sqrt((|q|^2 + eps D) (|k|^2 + eps D)). [..., M, 1] in fp32.

    The same value as the two `BranchRMSNorm`s and `signed_sqrt_gate`, up to float reassociation, in one product
    pass over [..., M, D] instead of six. `overwrite_key` (inference only) computes the products in the key's memory.
    """
    dim = query.shape[-1]
    denominator = (squared_norm(query) + eps * dim) * (squared_norm(key) + eps * dim)
    products = key.mul_(query) if overwrite_key else query * key
    scores = branch_dots(products, query_weight * key_weight) * torch.rsqrt(denominator / dim)
    return torch.sigmoid(scores.abs().clamp_min(1e-6).sqrt() * scores.sign())


def causal_depthwise_conv(
    inputs: torch.Tensor, taps: torch.Tensor, length: int, dilation: int, doc_positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal depthwise Conv1D as K shifted multiply-adds over channels-last inputs (no transposes, no padding copy):
    y[t] = sum_k taps[k] * x[t - (K - 1 - k) * dilation], positions before `inputs` reading zeros.

    `inputs` [B, P + T, C]: P positions of left context (cache state, 0 <= P) then the T = `length` new ones;
    `taps` [K, C] (`Conv1d.weight[:, 0].T`). `doc_positions` [B, T] (packed sequences): each position's index inside
    its document; a tap reaching further back than that reads zero, as before a sequence's start. Returns [B, T, C]
    in the taps' dtype (fp32 taps accumulate in fp32).
    """
    context = inputs.shape[1] - length
    kernel = taps.shape[0]
    outputs = inputs[:, context:] * taps[kernel - 1]
    for k in range(kernel - 1):
        shift = (kernel - 1 - k) * dilation
        start = context - shift
        tap = taps[k] if doc_positions is None else taps[k] * (doc_positions >= shift).unsqueeze(-1).to(taps.dtype)
        if start >= 0:
            outputs.addcmul_(inputs[:, start : start + length], tap)
        elif start + length > 0:
            outputs[:, -start:].addcmul_(inputs[:, : start + length], tap if doc_positions is None else tap[:, -start:])
    return outputs


def _plain(module: nn.Module, kind: type) -> bool:
    """`module` is a `kind` itself (not a PEFT wrapper) that no forward hook or Accelerate hook (`_hf_hook`) watches,
    so code may read its weights directly instead of calling it. (Reads `__dict__`: `hasattr` on a module costs an
    exception per missing attribute, and this runs on every decode step.)"""
    state = module.__dict__
    return (
        type(module) is kind and "_hf_hook" not in state
        and not state["_forward_hooks"] and not state["_forward_pre_hooks"]
    )


class EngramGate(nn.Module):
    """The context-aware gate as a module (no parameters), so forward hooks can read alpha [B, T, M, 1]
    (`visualize.gate_heatmap` does). `live` [B, T, 1, 1] zeroes the gate at dead tokens."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:
        gate = signed_sqrt_gate(query, key)
        return gate if live is None else gate * live.to(gate.dtype)


class EngramShortConv(nn.Module):
    """Y = SiLU(causal depthwise Conv1D(x)), kernel `engram_kernel_size`, dilation `max_ngram_size`.

    Zero-initialised, so a fresh Engram layer is the identity path plus its gated values. With a cache, the last
    (kernel - 1) * dilation inputs live in the layer's cache conv state ([B, C, L], transformers' layout), so
    decoding step by step equals one pass. The conv runs as K shifted multiply-adds (`causal_depthwise_conv`):
    it has 2 K C FLOPs per token, too few for a convolution routine's layout changes to pay.
    """

    def __init__(self, config: EngramConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        channels = config.hc_mult * config.hidden_size
        self.dilation = config.max_ngram_size
        self.state_len = (config.engram_kernel_size - 1) * self.dilation
        self.weight = nn.Parameter(torch.zeros(channels, 1, config.engram_kernel_size))  # depthwise [C, 1, K]

    def forward(
        self, hidden_states: torch.Tensor, cache: Cache | None = None, doc_positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """hidden_states [B, T, C] -> [B, T, C]; `doc_positions` [B, T]: see `causal_depthwise_conv`."""
        length = hidden_states.shape[1]
        weight = self.weight[:, 0]  # [C, K]
        if weight.dtype in (torch.float16, torch.bfloat16):
            weight = weight.float()  # accumulate in fp32
        if cache is None:
            outputs = causal_depthwise_conv(hidden_states, weight.t().contiguous(), length, self.dilation, doc_positions)
        else:
            inputs = cache.update_conv_state(  # [B, C, P + T]: transformers keeps time last
                hidden_states.transpose(1, 2), self.layer_idx, state_idx=CONV_STATE, conv_kernel_size=self.state_len
            )
            # P < L after a prompt shorter than the state while the cache records its past (assisted decoding keeps
            # the unpadded past to roll back): the general path reads zeros before the start.
            if length == 1 and inputs.shape[-1] > self.state_len:  # one step: its K inputs, channels first
                outputs = (inputs[..., -self.state_len - 1 :: self.dilation] * weight).sum(-1).unsqueeze(1)
            else:
                outputs = causal_depthwise_conv(inputs.transpose(1, 2), weight.t().contiguous(), length, self.dilation)
        outputs = F.silu(outputs, inplace=not torch.is_grad_enabled())
        return outputs if outputs.dtype == hidden_states.dtype else outputs.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.weight.shape[0]}, kernel_size={self.weight.shape[-1]}, dilation={self.dilation}"


class EngramKeyValue(nn.Module):
    """Shared value and per-branch keys of the memory rows: `forward(rows [B, T, d_mem]) -> (value [B, T, D],
    keys [B, T, M * D])`.

    `value_proj` (W_V, shared by the branches) and `key_proj` (the keys of all branches, part of the gate) are
    ordinary `nn.Linear`s, so PEFT can wrap the gating keys alone (LoRA, LN-tuning). Two matmuls cost what one over
    the concatenated weight costs, without copying the weights on every call (a decode step's matvec is as large
    as that copy). A joined copy kept across calls is not safe: writes through `.data` (PEFT's merge) do not bump
    a tensor's version, so nothing would tell it is stale.
    """

    def __init__(self, config: EngramConfig):
        super().__init__()
        self.value_proj = nn.Linear(config.engram_dim, config.hidden_size, bias=False)
        self.key_proj = nn.Linear(config.engram_dim, config.hc_mult * config.hidden_size, bias=False)

    def forward(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        value_proj, key_proj = self.value_proj, self.key_proj
        dtype = value_proj.weight.dtype
        if rows.dtype != dtype:
            rows = rows.to(dtype)
        return value_proj(rows), key_proj(rows)


class EngramLayer(nn.Module):
    """Engram at one decoder layer: `forward(hidden [B, T, hc * D], hash_ids [B, T, heads]) -> [B, T, hc * D]`.

    Per branch m: k_m = W_K^(m) e, v = W_V e (shared), alpha_m = gate(RMSNorm(h_m), RMSNorm(k_m)), u_m = alpha_m v;
    Y = SiLU(Conv(RMSNorm(U))) + U.

    Since u_m = alpha_m v, RMSNorm(u_m) = v * alpha_m / sqrt(alpha_m^2 ms(v) + eps) (ms: mean square over D): the
    conv input is a per-branch scale of the shared value, and neither U nor the normalised queries and keys are
    materialised (`normed_gate`). That path reads the norm weights directly, so it runs while the norms are plain
    and nobody hooks the gate or the conv; otherwise every module is called in turn (PEFT wrappers, forward hooks,
    `gate_heatmap`, Accelerate offload hooks), computing the same values up to float reassociation.
    """

    # Submodules that compute only the gate alpha, by role: what gating-only fine-tuning trains (gating_peft.py).
    gating_projections = ("kv_proj.key_proj",)
    gating_norms = ("query_norm", "key_norm")

    def __init__(self, config: EngramConfig, layer_idx: int, engram_loading: str | None = None):
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
            kernel=config.engram_kernel,
            row_format=config.engram_row_format,
            from_checkpoint=rows_from_checkpoint(config.engram_storage, engram_loading),
        )
        self.kv_proj = EngramKeyValue(config)
        self.query_norm = BranchRMSNorm(config.hc_mult, config.hidden_size, eps=config.rms_norm_eps)
        self.key_norm = BranchRMSNorm(config.hc_mult, config.hidden_size, eps=config.rms_norm_eps)
        if config.engram_kernel_size:  # 0: no short conv (DeepSeek-V4.1), the layer adds gate * value alone
            self.conv_norm = BranchRMSNorm(config.hc_mult, config.hidden_size, eps=config.rms_norm_eps)
            self.short_conv = EngramShortConv(config, layer_idx)
        else:
            self.conv_norm = self.short_conv = None
        self.gate = EngramGate()
        self.kernel = config.engram_kernel

    def _can_factor(self) -> bool:
        """Whether the factored formulation may read the norms' weights and modify the conv's output in place."""
        conv_plain = self.short_conv is None or (
            _plain(self.conv_norm, BranchRMSNorm) and _plain(self.short_conv, EngramShortConv)
        )
        return (
            _plain(self.query_norm, BranchRMSNorm) and _plain(self.key_norm, BranchRMSNorm)
            and _plain(self.gate, EngramGate) and conv_plain
        )

    def gated_values(
        self, hidden_states: torch.Tensor, key: torch.Tensor, value: torch.Tensor, live: torch.Tensor | None = None
    ) -> torch.Tensor:
        """u_m = alpha_m v for hidden [B, T, hc, D], projected keys [B, T, hc, D], value [B, T, D]: [B, T, hc, D];
        alpha is 0 where `live` [B, T, 1, 1] is (dead tokens)."""
        # The fused kernel never materialises alpha and reads the norm weights itself: it runs while the gate is
        # unwatched (gate_heatmap) and the norms are plain (PEFT's trainable copies act only through their forward).
        plain = _plain(self.gate, EngramGate) and _plain(self.query_norm, BranchRMSNorm)
        if plain and _plain(self.key_norm, BranchRMSNorm) and use_triton(self.kernel, hidden_states, key, value):
            values = load_kernels().fused_gate(
                hidden_states, key, value, self.query_norm.weight, self.key_norm.weight, self.query_norm.variance_epsilon
            )
            return values if live is None else values * live.to(values.dtype)
        gate = self.gate(self.query_norm(hidden_states), self.key_norm(key), live)
        return gate * value.unsqueeze(-2)

    def factored(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cache: Cache | None,
        mask: torch.Tensor | None,
        live: torch.Tensor | None = None,
        doc_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """U + SiLU(Conv(RMSNorm(U) * mask)) for query/key [B, T, M, D], value [B, T, D], mask [B, T, 1, 1] or None
        (U alone without a short conv); alpha is 0 where `live` [B, T, 1, 1] is.

        u_m = alpha_m v, so RMSNorm(u_m) = w_c,m * v * s_m with s_m = alpha_m / sqrt(alpha_m^2 ms(v) + eps): the conv
        input is the shared value scaled per branch. Without autograd the products and the conv inputs are computed
        in the keys' memory: fewer fresh [B, T, M, D] allocations (each costs page faults on the CPU).
        """
        inference = not torch.is_grad_enabled()
        query_norm, conv_norm = self.query_norm, self.conv_norm
        alpha = normed_gate(
            query, key, query_norm.weight, self.key_norm.weight, query_norm.variance_epsilon, overwrite_key=inference
        )  # [B, T, M, 1], fp32 (or fp64)
        if live is not None:
            alpha = alpha * live
        if self.short_conv is None:
            return alpha.to(value.dtype) * value.unsqueeze(-2)
        eps, dim = conv_norm.variance_epsilon, value.shape[-1]
        scale = alpha * torch.rsqrt(alpha.square() * squared_norm(value).unsqueeze(-1) / dim + eps)  # [B, T, M, 1]
        if mask is not None:
            scale = scale * mask
        if scale.dtype != value.dtype:
            alpha, scale = alpha.to(value.dtype), scale.to(value.dtype)
        value = value.unsqueeze(-2)  # [B, T, 1, D]
        conv_inputs = torch.mul(value, scale, out=key if inference else None)
        weight = conv_norm.weight
        conv_inputs = conv_inputs.mul_(weight) if inference else conv_inputs * weight  # = conv_norm(U) * mask
        outputs = self.short_conv(conv_inputs.flatten(-2), cache, doc_positions).unflatten(-1, key.shape[-2:])
        return outputs.addcmul_(alpha, value)  # the conv's own output: in place is safe

    def forward(
        self,
        hidden_states: torch.Tensor,
        hash_ids: torch.LongTensor,
        cache: Cache | None = None,
        token_mask: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        live_mask: torch.Tensor | None = None,
        doc_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`rows` [B, T, d_mem]: memory rows fetched ahead (prefetch); gathered here from `hash_ids` otherwise.
        `token_mask` [B, T]: padding positions (0) feed zeros to the conv, as positions before the start do.
        `live_mask` [B, T]: False at dead tokens (`engram_dead_token_ids`), where the gate is 0.
        `doc_positions` [B, T]: packed documents; the conv reads nothing of the document before."""
        branches = (self.hc_mult, self.hidden_size)
        value, keys = self.kv_proj(self.table(hash_ids) if rows is None else rows)
        query, key = hidden_states.unflatten(-1, branches), keys.unflatten(-1, branches)
        live = None if live_mask is None else live_mask[..., None, None].to(torch.float32)  # [B, T, 1, 1]
        if self._can_factor() and not use_triton(self.kernel, query, key, value):
            mask = None if token_mask is None else token_mask[..., None, None].to(value.dtype)  # [B, T, 1, 1]
            return self.factored(query, key, value, cache, mask, live, doc_positions).flatten(-2)
        values = self.gated_values(query, key, value, live)
        if self.short_conv is None:
            return values.flatten(-2)
        conv_inputs = self.conv_norm(values)
        if token_mask is not None:
            conv_inputs = conv_inputs * token_mask[..., None, None].to(conv_inputs.dtype)
        conv = self.short_conv(conv_inputs.flatten(-2), cache, doc_positions)
        return (values + conv.unflatten(-1, branches)).flatten(-2)


__all__ = [
    "EngramLayer", "EngramGate", "EngramKeyValue", "EngramShortConv", "BranchRMSNorm", "branch_dots",
    "causal_depthwise_conv", "normed_gate", "signed_sqrt_gate",
]
