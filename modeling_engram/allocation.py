"""Parameter counts and the sparsity allocation of the Engram paper (section 3.1, eq. 7).

With P_tot the total and P_act the activated parameters per token (both without the vocabulary embedding and the
LM head, as the paper counts them), the free budget P_sparse = P_tot - P_act is split by the allocation ratio rho:

    P_MoE^(sparse) = rho * P_sparse        (the routed experts a token does not use)
    P_Engram       = (1 - rho) * P_sparse  (the Engram table rows)

rho = 1 is a pure MoE; lowering rho removes routed experts and spends their parameters on Engram rows. Counts come
from the config alone (no model is built); tests check them against a model built on the meta device.
"""

from dataclasses import dataclass

from .configuration_engram import EngramConfig


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of a model described by an `EngramConfig`.

    total: every parameter. embeddings: vocabulary embedding plus LM head (once when tied). routed_experts: all
    routed-expert weights. engram_tables: all Engram table rows. sparse: what one token does not use (unchosen
    routed experts, unread table rows). `total_without_embeddings` and `activated` are the paper's P_tot and P_act.
    """

    total: int
    embeddings: int
    routed_experts: int
    engram_tables: int
    sparse: int

    @property
    def total_without_embeddings(self) -> int:
        return self.total - self.embeddings

    @property
    def activated(self) -> int:
        """P_act: parameters one token uses, without the vocabulary embedding and LM head."""
        return self.total_without_embeddings - self.sparse


def _linear(fan_in: int, fan_out: int, bias: bool) -> int:
    return fan_in * fan_out + (fan_out if bias else 0)


def _attention(config: EngramConfig) -> int:
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    hidden, bias = config.hidden_size, config.attention_bias
    return (
        _linear(hidden, q_width, bias)
        + 2 * _linear(hidden, kv_width, bias)
        + _linear(q_width, hidden, bias)
    )


def _swiglu(config: EngramConfig, width: int, bias: bool = False) -> int:
    return 2 * _linear(config.hidden_size, width, bias) + _linear(width, config.hidden_size, bias)


def expert_parameters(config: EngramConfig) -> int:
    """One routed expert of one layer: gate, up and down projections of width `moe_intermediate_size`."""
    return 3 * config.hidden_size * config.moe_intermediate_size


def engram_head_dim(config: EngramConfig) -> int:
    return config.n_embed_per_ngram // config.n_head_per_ngram


def moe_layers(config: EngramConfig) -> int:
    return sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))


def count_parameters(config: EngramConfig) -> ParameterCount:
    """Count the parameters of `EngramForCausalLM(config)` from the config (exact, no model built)."""
    m, hidden = config.hc_mult, config.hidden_size
    embeddings = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2)
    hyper_connection = m * hidden * m * (m + 2) + 3 + m * (m + 2) if m > 1 else 0
    total = embeddings + hidden  # final norm
    if m > 1:
        total += m * hidden * m + 1 + m  # HyperHead
    routed = tables = sparse = 0
    for layer_idx in range(config.num_hidden_layers):
        total += _attention(config) + 2 * hidden + 2 * hyper_connection
        if config.is_moe_layer(layer_idx):
            experts = config.n_routed_experts * expert_parameters(config)
            shared = config.n_shared_experts * config.moe_intermediate_size
            total += config.n_routed_experts * hidden + experts + (_swiglu(config, shared) if shared else 0)
            routed += experts
            sparse += (config.n_routed_experts - config.num_experts_per_tok) * expert_parameters(config)
        else:
            total += _swiglu(config, config.intermediate_size, config.mlp_bias)
        if layer_idx in config.engram_layer_ids:
            index = config.engram_layer_ids.index(layer_idx)
            sizes = config.engram_table_sizes[index]
            table = sum(sizes) * engram_head_dim(config)
            heads_read = len(sizes) * engram_head_dim(config)  # one row per head per token
            total += table + (1 + m) * hidden * config.engram_dim  # value and keys
            norms = 3 if config.engram_kernel_size else 2  # query, key and (with a short conv) conv norms
            total += norms * m * hidden + m * hidden * config.engram_kernel_size
            tables += table
            sparse += table - heads_read
    return ParameterCount(total=total, embeddings=embeddings, routed_experts=routed, engram_tables=tables, sparse=sparse)


@dataclass(frozen=True)
class SparsityAllocation:
    """The outcome of `allocate`: routed experts and Engram rows per head table for a ratio rho.

    `engram_rows_per_head` is the target size of every head table (`engram_vocab_size` entries; the hash tables
    then take the next distinct primes), 0 when rho leaves nothing for Engram. `achieved_rho` is the ratio after
    rounding the expert count.
    """

    rho: float
    sparse_budget: int
    n_routed_experts: int
    engram_rows_per_head: int
    moe_sparse: int
    engram_budget: int

    @property
    def achieved_rho(self) -> float:
        return self.moe_sparse / self.sparse_budget if self.sparse_budget else 1.0

    def apply(self, config: EngramConfig) -> EngramConfig:
        """A copy of `config` with these routed experts and table sizes (without Engram layers when 0 rows)."""
        if self.engram_rows_per_head:
            engram = dict(engram_vocab_size=[self.engram_rows_per_head] * (config.max_ngram_size - 1))
        else:
            engram = dict(engram_layer_ids=[])
        return config.with_changes(n_routed_experts=self.n_routed_experts, **engram)


def allocate(config: EngramConfig, total_parameters: int, activated_parameters: int, rho: float) -> SparsityAllocation:
    """Split P_sparse = `total_parameters` - `activated_parameters` by `rho` (paper eq. 7).

    Both budgets exclude the vocabulary embedding and LM head, like the paper's P_tot and P_act. `config` fixes the
    shapes: expert width, MoE layers and top-k for the routed experts, and the Engram layout (`engram_layer_ids`,
    orders, heads, head width) for the tables. The routed experts are `num_experts_per_tok` plus as many as
    rho * P_sparse pays for (rounded); the Engram rows share (1 - rho) * P_sparse evenly over all head tables.
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"allocate: rho={rho!r} is invalid; it must lie in [0, 1].")
    if config.n_routed_experts == 0:
        raise ValueError("allocate: config has n_routed_experts=0; it needs the MoE shapes (set n_routed_experts > 0).")
    sparse = total_parameters - activated_parameters
    if sparse < 0:
        raise ValueError(
            f"allocate: total_parameters={total_parameters} is below activated_parameters={activated_parameters}."
        )
    per_expert = expert_parameters(config) * moe_layers(config)
    inactive_experts = round(rho * sparse / per_expert)
    engram_budget = round((1 - rho) * sparse)
    head_tables = len(config.engram_layer_ids) * (config.max_ngram_size - 1) * config.n_head_per_ngram
    if engram_budget and not head_tables:
        raise ValueError(f"allocate: rho={rho} leaves {engram_budget} parameters for Engram, but engram_layer_ids is empty.")
    rows = engram_budget // (head_tables * engram_head_dim(config)) if head_tables else 0
    return SparsityAllocation(
        rho=rho,
        sparse_budget=sparse,
        n_routed_experts=config.num_experts_per_tok + inactive_experts,
        engram_rows_per_head=rows if rows >= 2 else 0,
        moe_sparse=inactive_experts * per_expert,
        engram_budget=engram_budget,
    )




def flops_per_token(config: EngramConfig, seq_len: int) -> int:
    """Forward FLOPs per token (multiply-adds x 2) at a context of `seq_len` tokens.

    Every matmul weight a token uses (attention and FFN projections, the experts it is routed to, Engram's
    value/key projection, mHC mixing, the LM head) costs 2 FLOPs per weight; attention scores and the weighted sum
    cost 2 x 2 x heads x head_dim per attended position, over all `seq_len` positions (what dense attention
    kernels compute; the causal mask halves the useful part).
    Table rows are gathered, not multiplied: they cost no FLOPs. Norms, activations and the short conv are left out.
    """
    counts = count_parameters(config)
    rows_read = len(config.engram_layer_ids) * config.engram_dim
    vocab_head = config.vocab_size * config.hidden_size
    matmul_weights = counts.activated - rows_read + vocab_head
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return int(2 * matmul_weights + attention)


__all__ = [
    "ParameterCount",
    "SparsityAllocation",
    "allocate",
    "count_parameters",
    "expert_parameters",
    "flops_per_token",
]
