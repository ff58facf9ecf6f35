"""EngramConfig: a Llama-style backbone plus the Engram conditional-memory fields.

The hash constants (multipliers, prime table sizes, compressed vocabulary size) are derived once, when a config
is first created, and stored in the config as plain JSON; a saved model therefore hashes identically forever,
whatever numpy does later. Prime table sizes are re-derived on load (pure integer maths) and must agree.
"""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from transformers.utils import logging

from .row_formats import get_row_format

logger = logging.get_logger(__name__)

INT64_MAX = 2**63 - 1
ENGRAM_STORAGES = ("device", "host", "disk")
ENGRAM_KERNELS = ("auto", "triton", "torch")
ATTENTION_TYPES = ("full_attention", "sliding_attention")
# How one process runs a model, not what the model is: load-time options (as transformers keeps attn_implementation),
# checked whenever they are set, kept on the loaded model's config and never written to config.json.
RUNTIME_OPTIONS = {
    "engram_storage": (lambda v: v in ENGRAM_STORAGES, f"it must be one of {ENGRAM_STORAGES}"),
    "engram_prefetch": (lambda v: isinstance(v, bool), "it must be True or False"),
    "engram_cache_rows": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                          "it must be an int >= 0 (0 disables the hot-row cache)"),
    "engram_kernel": (lambda v: v in ENGRAM_KERNELS, f"it must be one of {ENGRAM_KERNELS}"),
}
# Derived afresh from the other fields when a config is copied with changes (`EngramConfig.with_changes`).
DERIVED_FIELDS = ("engram_table_sizes", "engram_multipliers", "layer_types", "number_of_conv_states")
# An Engram layer keeps conv states next to its KV cache: transformers' "hybrid" cache layers (full or sliding).
ENGRAM_LAYER_TYPES = {"full_attention": "hybrid", "sliding_attention": "hybrid_sliding"}
LAYER_SEED_PRIME = 10007
# DeepSeek-V4.1's Engram layer (as vLLM, NeMo AutoModel and transformers' deepseek_v41 implement it), for
# `EngramConfig(**DEEPSEEK_V41_ENGRAM, engram_compressed_vocab_size=99_092, ...)` on the DeepSeek-V4 tokenizer:
# layers 1 and 14, orders 2-4 with 8 heads of width 256 each, prime search from 16,000,000 rows for every order, no
# short conv, gate RMSNorms with eps 1e-20, the image placeholder <｜image2｜> (129264) dead, FP8 rows.
DEEPSEEK_V41_ENGRAM = dict(
    vocab_size=129_280,
    engram_layer_ids=[1, 14],
    max_ngram_size=4,
    n_head_per_ngram=8,
    n_embed_per_ngram=8 * 256,
    engram_vocab_size=[16_000_000] * 3,
    engram_kernel_size=0,
    rms_norm_eps=1e-20,
    engram_dead_token_ids=[129_264],
    engram_row_format="fp8_e4m3",
    engram_pad_id=2,
)
_MILLER_RABIN_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin, exact for every n < 3.3e24."""
    if n < 2:
        return False
    for p in _MILLER_RABIN_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _MILLER_RABIN_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def engram_table_sizes(
    engram_layer_ids: list[int], engram_vocab_size: list[int], n_head_per_ngram: int
) -> list[list[int]]:
    """Distinct prime sizes of every head table, `[layer][order-2 block, head]` flattened per layer.

    Layer by layer, order by order, head by head: the first head of order n takes the smallest prime
    >= engram_vocab_size[n-2] not taken before; each next head the smallest untaken prime above the previous one.
    """
    taken: set[int] = set()
    sizes = []
    for _ in engram_layer_ids:
        layer_sizes = []
        for rows in engram_vocab_size:
            candidate = rows
            for _ in range(n_head_per_ngram):
                while not is_prime(candidate) or candidate in taken:
                    candidate += 1
                taken.add(candidate)
                layer_sizes.append(candidate)
                candidate += 1
        sizes.append(layer_sizes)
    return sizes


def multiplier_limit(compressed_vocab_size: int) -> int:
    """The largest multiplier m with x' * m below 2**63 for every compressed id x' < V': the hash's int64 mix then
    stays non-negative, so torch's, Triton's and numpy's `%` agree."""
    return INT64_MAX // compressed_vocab_size


def engram_multipliers(
    engram_layer_ids: list[int], max_ngram_size: int, compressed_vocab_size: int, seed: int
) -> list[list[int]]:
    """Odd multipliers m_k = 2 r_k + 1 per layer, r from numpy's PCG64 seeded with seed + 10007 * layer_id."""
    import numpy as np

    half_bound = max(1, multiplier_limit(compressed_vocab_size) // 2)
    multipliers = []
    for layer_id in engram_layer_ids:
        rng = np.random.default_rng(int(seed + LAYER_SEED_PRIME * int(layer_id)))
        r = rng.integers(low=0, high=half_bound, size=(max_ngram_size,), dtype=np.int64)
        multipliers.append([int(2 * v + 1) for v in r])
    return multipliers


@strict
class EngramConfig(PreTrainedConfig):
    r"""
    Configuration of an Engram model: a Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) with
    Engram conditional memory before attention at `engram_layer_ids`.

    Attention variants (what the pretrained families `EngramForCausalLM.from_base_model` takes over need):
        attention_bias: bias on the q/k/v projections (and on the output projection, unless
            `attention_output_bias` says otherwise). Qwen2: q/k/v biased, output not.
        attention_output_bias: bias on the output projection; None = `attention_bias`.
        qk_norm: RMSNorm over each query and key head before RoPE (Qwen3).
        sliding_window: the window of the sliding-attention layers (Mistral: every layer; Qwen2/3: the layers
            `layer_types` marks "sliding_attention"). None = full attention everywhere.
        layer_types: "full_attention" or "sliding_attention" per layer (default: all sliding when
            `sliding_window` is set, else all full). Stored with Engram layers as transformers' cache types
            "hybrid" / "hybrid_sliding" (KV cache plus the Engram conv states).
        engram_base_model: where a retrofitted model's backbone came from (`from_base_model`): name or path,
            `gguf_file`, architecture and a fingerprint of its weights; read by `from_engram_adapter`.

    Residual stream (mHC, Xie et al. 2025, "mHC: Manifold-Constrained Hyper-Connections"):
        hc_mult: number of residual branches M (1 = a plain residual, no hyper-connection parameters).
        hc_sinkhorn_iters: Sinkhorn-Knopp iterations projecting each residual mixing matrix towards the doubly
            stochastic matrices (the mHC paper uses 20).

    FFN (DeepSeekMoE with auxiliary-loss-free balancing; a dense SwiGLU MLP when `n_routed_experts` is 0):
        n_routed_experts: routed experts per MoE layer (0 = dense MLP in every layer).
        n_shared_experts: always-active experts per MoE layer, each of width `moe_intermediate_size`.
        num_experts_per_tok: routed experts chosen per token (top-k).
        moe_intermediate_size: width of one expert (defaults to `intermediate_size`).
        first_k_dense_replace: the first k layers keep the dense MLP (width `intermediate_size`).
        routed_scaling_factor: multiplies the routed experts' gate weights.
        norm_topk_prob: normalise the chosen experts' sigmoid scores to sum to 1.
        router_bias_update_speed: step gamma of the balancing bias: after each optimizer step
            (`model.update_router_biases()`), bias_i += gamma * sign(mean load - load_i). Not trained by gradient.

    Engram fields (defaults reproduce the public reference demo `engram_demo_v1.py`):
        engram_layer_ids: 0-based decoder layer indices that carry Engram; also the integers seeding the hashes.
            `[]` builds the backbone alone (a baseline without Engram).
        max_ngram_size: largest n-gram order N (orders 2..N are hashed).
        n_head_per_ngram: hash heads per order.
        n_embed_per_ngram: memory width per order (split evenly over its heads).
        engram_vocab_size: target rows per head table, one entry per order 2..N.
        engram_kernel_size: short-conv kernel size (dilation is max_ngram_size); 0 removes the short conv, its
            parameters and its generation state (DeepSeek-V4.1's layer: H <- H + gate * value).
        engram_seed: base seed of the hash multipliers.
        engram_pad_id: raw token id read before the start of a sequence (and at left-padding positions).
        engram_compressed_vocab_size: size of the compressed vocabulary produced by `build_token_map`
            (defaults to `vocab_size`, i.e. the identity token map).
        engram_multipliers, engram_table_sizes: derived hash constants, stored once; leave them unset.

    Compact rows and DeepSeek-V4.1's variant (with `engram_kernel_size=0`, `max_ngram_size=4` and `rms_norm_eps=1e-20`;
    docs/deepseek-v41.md):
        engram_row_format: how table rows are stored, in every storage and in the hot-row cache: "fp32", "bf16",
            "fp16", "fp8_e4m3" (V4.1: e4m3 values plus one ue8m0 scale byte per 32 values, inference only), or None
            (the model's dtype). `model.quantize_engram_tables(format)` converts a trained model.
        engram_dead_token_ids: raw token ids that are "dead" (V4.1: the image placeholder 129264): no n-gram reaches
            across one (the dead token and every older position read the pad id) and the gate is 0 at its position.

    Runtime options: how this process runs the model, not what the model is (as transformers treats
    `attn_implementation`). Given here or as `from_pretrained` keywords, checked however they arrive, never written
    to config.json (`RUNTIME_OPTIONS`; docs/tables.md):
        engram_storage: where the tables live: "device" (with the model, default), "host" (CPU memory, pinned when
            CUDA is present, while the rest may run on an accelerator) or "disk" (memory-mapped from the
            checkpoint's safetensors, rows read on demand).
        engram_prefetch: with host/disk tables, fetch every Engram layer's rows asynchronously at model entry.
        engram_cache_rows: rows per table kept in a hot-row cache on the execution device (0 = no cache).
        engram_kernel: which implementation runs hash, gather and gate: "auto" (the torch path, until the Triton
            kernels of the `engram_kernels` package have passed a GPU run; then Triton on CUDA tensors), "triton"
            (the kernels on CUDA, also under TRITON_INTERPRET=1 on the CPU; torch where Triton cannot run) or
            "torch". A preference, not a requirement: the parameters are the same either way, so any checkpoint runs
            anywhere.
    """

    model_type = "engram"
    keys_to_ignore_at_inference = ["cache"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    vocab_size: int = 129280
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 30
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: int | float | None = 0.0
    mlp_bias: bool = False
    attention_output_bias: bool | None = None
    qk_norm: bool = False
    sliding_window: int | None = None

    hc_mult: int = 1
    hc_sinkhorn_iters: int = 20
    n_routed_experts: int = 0
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int | None = None
    first_k_dense_replace: int = 0
    routed_scaling_factor: int | float = 1.0
    norm_topk_prob: bool = True
    router_bias_update_speed: int | float = 1e-3
    engram_layer_ids: list[int] | None = None
    max_ngram_size: int = 3
    n_head_per_ngram: int = 8
    n_embed_per_ngram: int = 512
    engram_vocab_size: list[int] | None = None
    engram_kernel_size: int = 4
    engram_seed: int = 0
    engram_pad_id: int = 2
    engram_compressed_vocab_size: int | None = None
    engram_multipliers: list[list[int]] | None = None
    engram_table_sizes: list[list[int]] | None = None
    engram_row_format: str | None = None
    engram_dead_token_ids: list[int] | None = None
    layer_types: list[str] | None = None
    number_of_conv_states: int = 2
    engram_base_model: dict | None = None
    # runtime options (RUNTIME_OPTIONS): not saved
    engram_storage: str = "device"
    engram_prefetch: bool = True
    engram_cache_rows: int = 0
    engram_kernel: str = "auto"

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.engram_layer_ids is None:
            self.engram_layer_ids = [1, 15]
        self.engram_layer_ids = [int(i) for i in self.engram_layer_ids]
        if self.engram_vocab_size is None:
            self.engram_vocab_size = [self.vocab_size * 5] * (self.max_ngram_size - 1)
        if self.engram_compressed_vocab_size is None:
            self.engram_compressed_vocab_size = self.vocab_size
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        self.engram_dead_token_ids = sorted(int(i) for i in self.engram_dead_token_ids or [])
        self._validate_engram()
        self._validate_backbone()
        # Engram layers keep their token history next to their KV cache, and their short-conv inputs when they have one.
        self.layer_types = [
            ENGRAM_LAYER_TYPES[kind] if i in self.engram_layer_ids else kind
            for i, kind in enumerate(self._attention_types())
        ]
        self.number_of_conv_states = 2 if self.engram_kernel_size else 1
        sizes = engram_table_sizes(self.engram_layer_ids, self.engram_vocab_size, self.n_head_per_ngram)
        if self.engram_table_sizes is None:
            self.engram_table_sizes = sizes
        elif self.engram_table_sizes != sizes:
            raise ValueError(
                f"engram_table_sizes {self.engram_table_sizes} disagree with the sizes derived from "
                f"engram_vocab_size={self.engram_vocab_size}, n_head_per_ngram={self.n_head_per_ngram} and "
                f"engram_layer_ids={self.engram_layer_ids}: {sizes}. Remove engram_table_sizes to re-derive them."
            )
        if self.engram_multipliers is None:
            self.engram_multipliers = engram_multipliers(
                self.engram_layer_ids, self.max_ngram_size, self.engram_compressed_vocab_size, self.engram_seed
            )
        self._validate_multipliers()
        super().__post_init__(**kwargs)

    def __setattr__(self, key, value):
        # Runtime options arrive as constructor fields, as `from_pretrained` keywords (which transformers sets after
        # construction, past __post_init__) or by assignment: all pass here.
        if key in RUNTIME_OPTIONS and not RUNTIME_OPTIONS[key][0](value):
            raise ValueError(f"EngramConfig: {key}={value!r} is invalid; {RUNTIME_OPTIONS[key][1]}.")
        super().__setattr__(key, value)

    def to_dict(self) -> dict:
        """transformers' dict (config.json, `to_diff_dict`, the Hub), without the runtime options."""
        return {k: v for k, v in super().to_dict().items() if k not in RUNTIME_OPTIONS}

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """transformers' `from_dict`; runtime options stored by older versions are ignored (with a warning): they
        come from the loading call only, so a model saved from disk does not load from disk elsewhere."""
        stored = {key: config_dict[key] for key in RUNTIME_OPTIONS if key in config_dict}
        if stored:
            logger.warning_once(
                f"This config.json stores {stored}: runtime options, which are not part of the model any more. They "
                "are ignored; pass them to from_pretrained instead (e.g. engram_storage='host')."
            )
        return super().from_dict({k: v for k, v in config_dict.items() if k not in RUNTIME_OPTIONS}, **kwargs)

    def with_changes(self, **changes) -> "EngramConfig":
        """A new config with `changes`: derived values (hash constants, cache layer types) derived afresh, the
        attention pattern and runtime options kept unless changed."""
        settings = {k: v for k, v in self.to_dict().items()
                    if k not in (*DERIVED_FIELDS, "model_type", "transformers_version", "architectures")}
        settings |= {key: getattr(self, key) for key in RUNTIME_OPTIONS}
        if not {"num_hidden_layers", "sliding_window"} & changes.keys():
            settings["layer_types"] = self._attention_types()
        return EngramConfig(**(settings | changes))

    def _validate_engram(self):
        def fail(name, value, allowed):
            raise ValueError(f"EngramConfig: {name}={value!r} is invalid; {allowed}.")

        for name in ("hc_mult", "n_head_per_ngram", "n_embed_per_ngram"):
            if getattr(self, name) < 1:
                fail(name, getattr(self, name), "it must be >= 1")
        if self.engram_kernel_size < 0:
            fail("engram_kernel_size", self.engram_kernel_size, "it must be >= 1, or 0 for no short conv")
        if self.max_ngram_size < 2:
            fail("max_ngram_size", self.max_ngram_size, "it must be >= 2 (orders 2..max_ngram_size are hashed)")
        if len(set(self.engram_layer_ids)) != len(self.engram_layer_ids):
            fail("engram_layer_ids", self.engram_layer_ids, "layer ids must be distinct")
        for layer_id in self.engram_layer_ids:
            if not 0 <= layer_id < self.num_hidden_layers:
                fail("engram_layer_ids", self.engram_layer_ids,
                     f"each id must lie in [0, {self.num_hidden_layers - 1}] (num_hidden_layers={self.num_hidden_layers})")
        if len(self.engram_vocab_size) != self.max_ngram_size - 1:
            fail("engram_vocab_size", self.engram_vocab_size,
                 f"it needs one entry per n-gram order 2..{self.max_ngram_size}, i.e. {self.max_ngram_size - 1} entries")
        if any(rows < 2 for rows in self.engram_vocab_size):
            fail("engram_vocab_size", self.engram_vocab_size, "every entry must be >= 2")
        if self.n_embed_per_ngram % self.n_head_per_ngram:
            fail("n_embed_per_ngram", self.n_embed_per_ngram,
                 f"it must be divisible by n_head_per_ngram={self.n_head_per_ngram}")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", self.num_key_value_heads,
                 f"it must divide num_attention_heads={self.num_attention_heads}")
        if not 1 <= self.engram_compressed_vocab_size <= self.vocab_size:
            fail("engram_compressed_vocab_size", self.engram_compressed_vocab_size,
                 f"it must lie in [1, vocab_size={self.vocab_size}]")
        if self.sliding_window is not None and self.sliding_window < 1:
            fail("sliding_window", self.sliding_window, "it must be >= 1, or None for full attention")
        if not 0 <= self.engram_pad_id < self.vocab_size:
            fail("engram_pad_id", self.engram_pad_id, f"it must be a raw token id in [0, {self.vocab_size - 1}]")
        dead = self.engram_dead_token_ids
        if len(set(dead)) != len(dead) or not all(0 <= i < self.vocab_size for i in dead):
            fail("engram_dead_token_ids", dead, f"they must be distinct raw token ids in [0, {self.vocab_size - 1}]")
        if self.engram_pad_id in dead:
            fail("engram_dead_token_ids", dead, f"the pad id {self.engram_pad_id} (what dead positions read) cannot be dead")
        try:
            get_row_format(self.engram_row_format, self.n_embed_per_ngram // self.n_head_per_ngram)
        except ValueError as error:
            raise ValueError(f"EngramConfig: {error}") from None

    def _validate_backbone(self):
        def fail(name, value, allowed):
            raise ValueError(f"EngramConfig: {name}={value!r} is invalid; {allowed}.")

        if self.hc_sinkhorn_iters < 1:
            fail("hc_sinkhorn_iters", self.hc_sinkhorn_iters, "it must be >= 1")
        if self.n_routed_experts < 0:
            fail("n_routed_experts", self.n_routed_experts, "it must be >= 0 (0 = dense MLP in every layer)")
        if self.n_routed_experts == 0:
            return
        if self.n_shared_experts < 0:
            fail("n_shared_experts", self.n_shared_experts, "it must be >= 0")
        if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            fail("num_experts_per_tok", self.num_experts_per_tok,
                 f"it must lie in [1, n_routed_experts={self.n_routed_experts}]")
        if self.moe_intermediate_size < 1:
            fail("moe_intermediate_size", self.moe_intermediate_size, "it must be >= 1")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            fail("first_k_dense_replace", self.first_k_dense_replace,
                 f"it must lie in [0, num_hidden_layers={self.num_hidden_layers}]")
        if not self.routed_scaling_factor > 0:
            fail("routed_scaling_factor", self.routed_scaling_factor, "it must be > 0")
        if not self.router_bias_update_speed >= 0:
            fail("router_bias_update_speed", self.router_bias_update_speed, "it must be >= 0")

    def _attention_types(self) -> list[str]:
        """ "full_attention" / "sliding_attention" per layer, from `layer_types` (Engram cache types read back)."""
        if self.layer_types is None:
            return [ATTENTION_TYPES[self.sliding_window is not None]] * self.num_hidden_layers
        plain = {engram: kind for kind, engram in ENGRAM_LAYER_TYPES.items()}
        kinds = [plain.get(kind, kind) for kind in self.layer_types]
        if len(kinds) != self.num_hidden_layers or not set(kinds) <= set(ATTENTION_TYPES):
            raise ValueError(
                f"EngramConfig: layer_types={self.layer_types!r} is invalid; it needs one of {ATTENTION_TYPES} per "
                f"layer ({self.num_hidden_layers} entries)."
            )
        if "sliding_attention" in kinds and self.sliding_window is None:
            raise ValueError("EngramConfig: layer_types has sliding_attention layers but sliding_window is None.")
        return kinds

    def attention_type(self, layer_idx: int) -> str:
        """ "full_attention" or "sliding_attention": which causal mask layer `layer_idx` attends with."""
        sliding = self.layer_types[layer_idx] in ("sliding_attention", ENGRAM_LAYER_TYPES["sliding_attention"])
        return ATTENTION_TYPES[sliding]

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` has a DeepSeekMoE FFN (else the dense SwiGLU MLP)."""
        return self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace

    def _validate_multipliers(self):
        expected = (len(self.engram_layer_ids), self.max_ngram_size)
        shape = (len(self.engram_multipliers), *({len(m) for m in self.engram_multipliers} or {self.max_ngram_size}))
        if shape != expected:
            raise ValueError(
                f"EngramConfig: engram_multipliers has shape {shape}, expected {expected} "
                "(one multiplier per n-gram position for every Engram layer)."
            )
        limit = multiplier_limit(self.engram_compressed_vocab_size)
        for layer_multipliers in self.engram_multipliers:
            for m in layer_multipliers:
                if not (m > 0 and m % 2 == 1 and m <= limit):
                    raise ValueError(
                        f"EngramConfig: multiplier {m} is invalid; multipliers must be odd and in [1, {limit}] "
                        f"for engram_compressed_vocab_size={self.engram_compressed_vocab_size}."
                    )

    @property
    def engram_dim(self) -> int:
        """d_mem: width of the memory vector read by one Engram layer."""
        return (self.max_ngram_size - 1) * self.n_embed_per_ngram


__all__ = ["DEEPSEEK_V41_ENGRAM", "EngramConfig"]
