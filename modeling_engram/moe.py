"""DeepSeekMoE FFN: shared experts plus fine-grained routed experts, top-k sigmoid routing with the
auxiliary-loss-free balancing bias (DeepSeek-V3 technical report, section 2.1.2).

Routing per token: s_i = sigmoid(u . e_i); the top-k experts by s_i + b_i are chosen, and weighted by their s_i
(normalised over the chosen k when `norm_topk_prob`, times `routed_scaling_factor`). The bias b only steers the
choice and never receives a gradient: training forwards count each expert's tokens, and
`EngramTopKRouter.update_bias` (called through `model.update_router_biases()` after each optimizer step) moves
b_i by `router_bias_update_speed` towards balance, b_i += gamma * sign(mean load - load_i).
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation

from .configuration_engram import EngramConfig


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)) of width `intermediate_size`; the shared experts of a MoE layer, as one MLP."""

    def __init__(self, config: EngramConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class EngramTopKRouter(nn.Module):
    """`forward(hidden [N, D], token_mask [N] | None) -> (weights [N, k], expert ids [N, k])`.

    Buffers: `e_score_correction_bias` [E] (persistent, fp32: the balancing bias) and `expert_load` [E]
    (tokens routed to each expert by training forwards since the last `update_bias`; not saved).
    """

    def __init__(self, config: EngramConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.bias_update_speed = config.router_bias_update_speed
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        self.e_score_correction_bias = nn.Buffer(torch.zeros(self.num_experts, dtype=torch.float32))
        self.expert_load = nn.Buffer(torch.zeros(self.num_experts, dtype=torch.float32), persistent=False)

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits [N, E], top-k weights [N, k], expert ids [N, k]); the logits first, as transformers'
        DeepSeek-V3 router returns them, for `output_router_logits`."""
        router_logits = F.linear(hidden_states.float(), self.weight.float())
        scores = torch.sigmoid(router_logits)
        expert_ids = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(-1, expert_ids)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.training:
            self.count_load(expert_ids, token_mask)
        return router_logits, weights * self.routed_scaling_factor, expert_ids

    @torch.no_grad()
    def count_load(self, expert_ids: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        """Add this batch's tokens per expert (padding excluded) to `expert_load`.

        A gradient-checkpointing recompute counts a batch twice with the same routing, which scales every count
        alike and so leaves the sign update unchanged.
        """
        counted = torch.ones_like(expert_ids, dtype=torch.float32)
        if token_mask is not None:
            counted = counted * token_mask.reshape(-1, 1).to(torch.float32)
        self.expert_load.index_add_(0, expert_ids.flatten(), counted.flatten())

    @torch.no_grad()
    def update_bias(self) -> None:
        """b_i += gamma * sign(mean load - load_i) from the counted load (summed over ranks), then reset the count.

        A no-op when nothing was counted (eval, generation, or a second call), so it is safe to call every step.
        """
        load = self.expert_load
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        if load.sum() > 0:
            self.e_score_correction_bias += self.bias_update_speed * torch.sign(load.mean() - load)
        load.zero_()

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, bias_update_speed={self.bias_update_speed}"


@use_experts_implementation
class EngramExperts(nn.Module):
    """All routed experts as 3D weights: `gate_up_proj` [E, 2I, D] and `down_proj` [E, D, I].

    `forward(hidden [N, D], expert ids [N, k], weights [N, k]) -> [N, D]`. This readable path groups the (token,
    expert) pairs by expert and runs one matmul per expert (a loop over experts, never over tokens); transformers'
    `experts_implementation` ("grouped_mm", the default, or "batched_mm") replaces it with one grouped kernel.
    """

    def __init__(self, config: EngramConfig):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.gate_up_proj = nn.Parameter(
            torch.empty(self.num_experts, 2 * config.moe_intermediate_size, config.hidden_size)
        )
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, config.moe_intermediate_size))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        num_tokens, top_k = top_k_index.shape
        expert_ids = top_k_index.flatten()
        order = torch.argsort(expert_ids, stable=True)  # (token, slot) pairs grouped by expert
        rows_per_expert = torch.bincount(expert_ids, minlength=self.num_experts).tolist()
        grouped = hidden_states[order // top_k].split(rows_per_expert)
        outputs = []
        for expert, rows in enumerate(grouped):
            gate, up = F.linear(rows, self.gate_up_proj[expert]).chunk(2, dim=-1)
            outputs.append(F.linear(self.act_fn(gate) * up, self.down_proj[expert]))
        weighted = torch.cat(outputs) * top_k_weights.flatten()[order].unsqueeze(-1).to(hidden_states.dtype)
        per_slot = torch.empty_like(weighted).index_copy_(0, order, weighted)  # back to (token, slot) order
        return per_slot.view(num_tokens, top_k, -1).sum(dim=1)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, intermediate_size={self.down_proj.shape[-1]}"


class EngramMoE(nn.Module):
    """DeepSeekMoE FFN `[B, T, D] -> [B, T, D]`: shared experts (one SwiGLU of width n_shared * I) plus the
    weighted top-k routed experts. `token_mask` [B, T] (1 = real token) keeps padding out of the load count."""

    def __init__(self, config: EngramConfig):
        super().__init__()
        self.gate = EngramTopKRouter(config)
        self.experts = EngramExperts(config)
        shared = config.n_shared_experts * config.moe_intermediate_size
        self.shared_experts = SwiGLU(config, shared) if shared > 0 else None

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        _, weights, expert_ids = self.gate(flat, token_mask)
        output = self.experts(flat, expert_ids, weights).view_as(hidden_states)
        if self.shared_experts is not None:
            output = output + self.shared_experts(hidden_states)
        return output


__all__ = ["EngramMoE", "EngramTopKRouter", "EngramExperts", "SwiGLU"]
