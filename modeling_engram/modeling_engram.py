"""Engram model family: decoder layer, EngramPreTrainedModel, EngramModel, EngramForCausalLM.

The backbone is transformers' Llama (RMSNorm, RoPE, grouped-query attention through the attention interface,
SwiGLU MLP), reused rather than copied, with the paper's options: an mHC residual of `hc_mult` branches (mhc.py)
and DeepSeekMoE FFNs (moe.py). `EngramAttention` adds the attention variants of the families a retrofit takes over
(Mistral, Qwen2, Qwen3: output-projection bias, q/k norms, sliding windows). Engram sits before attention at
`config.engram_layer_ids`. The hash ids of every Engram layer are computed once, at model entry, from the token ids
alone.

This file and the same-folder modules it imports (`from .module import name`, nothing else) are what
`save_pretrained` exports for `trust_remote_code`; package helpers (token map, hub, retrofit) stay out of it.
"""

import contextvars
import importlib
from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_engram import EngramConfig
from .engram_layer import TOKEN_STATE, EngramKeyValue, EngramLayer, EngramShortConv
from .hashing import EngramHasher
from .memory import (
    DTENSOR, EngramTable, RowFetch, attach_checkpoint_tables, check_checkpoint_tables,
)
from .mhc import DYNAMIC_SCALE_INIT, HyperConnection, HyperHead, PlainResidual
from .moe import EngramExperts, EngramMoE, EngramTopKRouter
from .placement import resolve_table_placement
from .table_parallel import require_process_group, save_table_shards, shard_engram_tables, sharded_tables


# vLLM's (and SGLang's) Transformers backend runs a model it accepts on packed, cache-less [1, T] rows: Engram's n-grams
# would hash across request boundaries, and every decode step would hash one token without its history.
PACKED_BACKEND_REFUSAL = (
    "{name} is not compatible with vLLM's Transformers backend (model_impl='transformers'), nor SGLang's: they run a "
    "model on packed, cache-less [1, T] rows of several requests, so Engram's n-gram hashes would span request "
    "boundaries and each decode step would hash one token without its history: silently wrong output. Serve it with "
    "`engram-serve MODEL` (pip install 'modeling_engram[serve]'), or call `generate` with left padding."
)
# transformers' continuous batching (generate_batch, init_continuous_batching, generate(cache_implementation="paged"))
CONTINUOUS_BATCHING_REFUSAL = (
    "{name} does not support transformers' continuous batching (generate_batch, init_continuous_batching, "
    "generate(cache_implementation='paged')): its paged cache keeps only keys and values, and has no slot for an Engram "
    "layer's per-request token history and short-conv state, so cached decoding could not be exact. Use "
    "`generate` on a left-padded batch (tokenizer.padding_side = 'left'; exact), or `engram-serve MODEL` for an "
    "OpenAI-compatible server that batches concurrent requests that way."
)
# True only inside `EngramPreTrainedModel.set_attn_implementation`: see `_can_set_attn_implementation`.
SETTING_ATTENTION = contextvars.ContextVar("engram_setting_attention", default=False)


def _package_helper(name: str):
    """A helper module of the installed modeling_engram package (hub, retrofit), or None: helpers are never exported
    with a model, so code loaded with trust_remote_code runs without them."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"{__package__}.{name}":
            raise
        return None


def _required_helper(name: str):
    helper = _package_helper(name)
    if helper is None:
        raise ImportError(f"this needs the modeling_engram package installed ({name}.py is not exported with a model).")
    return helper


class EngramAttention(LlamaAttention):
    """Llama's attention plus the variants of the families a retrofit takes over: an output projection with its own
    bias setting (Qwen2: q/k/v biased, output not), an RMSNorm over each query and key head before RoPE (Qwen3), and
    a sliding window on the layers `config.layer_types` marks (Mistral, Qwen2/3). Parameter names are the families'
    own (`q_norm`, `k_norm`), so their checkpoints load as they are."""

    def __init__(self, config: EngramConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        output_bias = config.attention_bias if config.attention_output_bias is None else config.attention_output_bias
        if output_bias != config.attention_bias:
            self.o_proj = nn.Linear(self.o_proj.in_features, self.o_proj.out_features, bias=output_bias)
        self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else nn.Identity()
        sliding = config.attention_type(layer_idx) == "sliding_attention"
        self.sliding_window = config.sliding_window if sliding else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        key_states = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        return self.o_proj(attn_output.reshape(*input_shape, -1).contiguous()), attn_weights


class EngramDecoderLayer(GradientCheckpointingLayer):
    """h += Engram(h) (Engram layers only, per branch), then attention and FFN, each inside its residual.

    The stream holds `hc_mult` branches: it enters and leaves as [B, T, hc_mult, hidden] (transformers' in-tree
    DeepSeek-V4 convention, so recorded hidden states match it), or [B, T, hidden] when hc_mult == 1, and runs inside
    as [B, T, hc_mult * hidden]. With hc_mult > 1 each sublayer sits in an mHC
    hyper-connection (`attn_hc`, `mlp_hc`: pre-mix M -> 1, post-distribution 1 -> M, doubly stochastic residual
    mixing M x M); with hc_mult == 1 they are plain residuals, and the layer is Llama's pre-norm decoder layer.
    The FFN is Llama's dense MLP, or DeepSeekMoE (`config.is_moe_layer`).
    """

    def __init__(self, config: EngramConfig, layer_idx: int, engram_loading: str | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.engram = EngramLayer(config, layer_idx, engram_loading) if layer_idx in config.engram_layer_ids else None
        self.self_attn = EngramAttention(config=config, layer_idx=layer_idx)
        self.mlp = EngramMoE(config) if config.is_moe_layer(layer_idx) else LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn_hc = HyperConnection(config) if config.hc_mult > 1 else PlainResidual()
        self.mlp_hc = HyperConnection(config) if config.hc_mult > 1 else PlainResidual()

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        engram_hash_ids: dict[int, torch.LongTensor] | None = None,
        engram_token_mask: torch.Tensor | None = None,
        engram_live_mask: torch.Tensor | None = None,
        engram_rows: dict[int, RowFetch] | None = None,
        engram_doc_positions: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        streams, hidden_states = hidden_states, hidden_states.flatten(2)
        if self.engram is not None:
            fetched = engram_rows.get(self.layer_idx) if engram_rows else None
            hidden_states = hidden_states + self.engram(
                hidden_states,
                engram_hash_ids[self.layer_idx],
                cache=cache,
                token_mask=engram_token_mask,
                live_mask=engram_live_mask,
                rows=fetched.wait() if fetched is not None else None,
                doc_positions=engram_doc_positions,
            )
        layer_input, post, res = self.attn_hc(hidden_states)
        attn_output, _ = self.self_attn(
            hidden_states=self.input_layernorm(layer_input),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = self.attn_hc.add(hidden_states, attn_output, post, res)
        layer_input, post, res = self.mlp_hc(hidden_states)
        layer_input = self.post_attention_layernorm(layer_input)
        if isinstance(self.mlp, EngramMoE):
            mlp_output = self.mlp(layer_input, token_mask=engram_token_mask)
        else:
            mlp_output = self.mlp(layer_input)
        hidden_states = self.mlp_hc.add(hidden_states, mlp_output, post, res)
        # A view only where the shape changes: FSDP2 warns when a block returns a view (an in-place op on it would
        # skip FSDP's backward hook).
        return hidden_states if hidden_states.dim() == streams.dim() else hidden_states.view_as(streams)


class EngramPreTrainedModel(PreTrainedModel):
    config: EngramConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EngramDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    # False, and `is_backend_compatible` raises: vLLM's Transformers backend would run Engram wrongly (above).
    _supports_attention_backend = False
    # Router logits as transformers' DeepSeek-V3 records them (None for a dense model): `output_router_logits=True`.
    _can_record_outputs = {"hidden_states": EngramDecoderLayer, "attentions": EngramAttention,
                           "router_logits": OutputRecorder(EngramTopKRouter, index=0)}
    # Host/disk tables are read by `attach_checkpoint_tables`, so transformers must not load (or warn about) them.
    _keys_to_ignore_on_load_unexpected = [r"engram\.table\.weight(_scale)?$"]

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers asks the class, by searching its module's source for the experts decorator, which lives in
        # moe.py here. Whether a model has experts depends on its config: the check below refuses them for a dense one.
        return True

    def _check_and_adjust_experts_implementation(self, experts_implementation: str | None) -> str:
        # Private transformers hook (tests/test_private_api.py checks its signature): the one every path that sets an
        # experts implementation (__init__, from_pretrained, set_experts_implementation) goes through.
        if not any(self.config.is_moe_layer(i) for i in range(self.config.num_hidden_layers)):
            if experts_implementation not in (None, "eager"):
                raise ValueError(
                    f"{type(self).__name__} has no experts (n_routed_experts={self.config.n_routed_experts}, "
                    f"first_k_dense_replace={self.config.first_k_dense_replace}), so experts_implementation="
                    f"{experts_implementation!r} does not apply."
                )
            return "eager"
        return super()._check_and_adjust_experts_implementation(experts_implementation)

    @classmethod
    def is_backend_compatible(cls) -> bool:
        """Never: raises the reason. vLLM's and SGLang's registries call this before running a model through their
        Transformers backend, which packs requests into one cache-less row (see `PACKED_BACKEND_REFUSAL`)."""
        raise ValueError(PACKED_BACKEND_REFUSAL.format(name=cls.__name__))

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """False outside `set_attn_implementation`. vLLM accepts a remote-code model whose class answers True here
        (or to `is_backend_compatible`); transformers asks it only inside `set_attn_implementation`, which this class
        wraps, so switching attention still works. Helpers that ask first (transformers' export utilities) keep the
        model's attention as loaded."""
        return SETTING_ATTENTION.get()

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        """transformers' `set_attn_implementation` (every Engram attention goes through the attention interface)."""
        token = SETTING_ATTENTION.set(True)
        try:
            return super().set_attn_implementation(attn_implementation, *args, **kwargs)
        finally:
            SETTING_ATTENTION.reset(token)

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """transformers' resize, followed by the hasher: kept ids hash as before, new ids get compressed ids of their
        own (`EngramHasher.resized_token_map`, checked before anything is resized)."""
        hasher = self.base_model.hasher
        size = hasher.vocab_size if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of is not None:
            size = -(-size // pad_to_multiple_of) * pad_to_multiple_of
        hasher.resized_token_map(size)  # raises before the embeddings change
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        self.config.engram_compressed_vocab_size = hasher.resize(embeddings.num_embeddings)
        self.base_model.vocab_size = embeddings.num_embeddings
        return embeddings

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, EngramTable):  # an nn.Embedding: initialised here alone, so its rows are drawn once
            if module.weight is not None and module.scaled:
                module.init_fp8_rows(std)
            elif module.weight is not None and module.weight.requires_grad:
                init.normal_(module.weight, mean=0.0, std=std)
            init.copy_(module.offsets, module.head_offsets())
            return
        super()._init_weights(module)
        if isinstance(module, (HyperConnection, HyperHead)):
            init.normal_(module.proj, mean=0.0, std=std)
            init.constant_(module.scale, DYNAMIC_SCALE_INIT)
            init.copy_(module.bias, module.static_bias())
        elif isinstance(module, EngramTopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.e_score_correction_bias)
            init.zeros_(module.expert_load)
        elif isinstance(module, EngramExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, EngramShortConv):
            init.zeros_(module.weight)
        elif isinstance(module, EngramHasher):
            init.copy_(module.token_map, module.default_token_map())
            init.copy_(module.multiplier_tensor, torch.tensor(self.config.engram_multipliers, dtype=torch.long))
            init.copy_(module.table_size_tensor, torch.tensor(self.config.engram_table_sizes, dtype=torch.long))
            init.copy_(module.dead_tokens, module.default_dead_tokens())

    @torch.no_grad()
    def update_router_biases(self) -> None:
        """Auxiliary-loss-free balancing: move every MoE router's bias by the expert load counted since the last
        call. Call it after each optimizer step, e.g. `optimizer.register_step_post_hook(lambda *_:
        model.update_router_biases())`; a no-op without MoE layers or when no training forward ran."""
        for module in self.modules():
            if isinstance(module, EngramTopKRouter):
                module.update_bias()

    def quantize_engram_tables(self, row_format: str = "fp8_e4m3") -> None:
        """Re-store every Engram table in `row_format` ("fp8_e4m3", "bf16", "fp16" or "fp32"; FP8 quantised per
        block of 32 values with power-of-two scales) and record it in the config, so `save_pretrained` writes the
        compact rows and every storage reloads them. FP8 tables serve inference; they do not train."""
        from tqdm.auto import tqdm

        tables = [m for m in self.modules() if isinstance(m, EngramTable)]
        with tqdm(total=sum(t.num_embeddings for t in tables), desc=f"Engram rows -> {row_format}", unit="row",
                  disable=len(tables) == 0) as progress:
            for table in tables:
                table.convert_rows(row_format, progress=progress.update)
        self.config.engram_row_format = row_format

    def set_token_map(self, token_map: torch.Tensor) -> None:
        """Install the tokenizer-compression map built by `build_token_map` (checked against the config)."""
        self.base_model.hasher.set_token_map(token_map)

    @staticmethod
    def export_auto_map() -> dict[str, str]:
        """The `auto_map` of an exported folder: every Auto class its code serves, as `module.Class`."""
        module = __name__.rsplit(".", 1)[-1]
        return {
            "AutoConfig": f"{EngramConfig.__module__.rsplit('.', 1)[-1]}.{EngramConfig.__name__}",
            "AutoModel": f"{module}.{EngramModel.__name__}",
            "AutoModelForCausalLM": f"{module}.{EngramForCausalLM.__name__}",
        }

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained; with the code exported (`register_for_auto_class`, done on import of the
        package), config.json's `auto_map` names all three Auto classes, whichever of them this model is."""
        if self.is_remote_code():
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **self.export_auto_map()}
        shards = sharded_tables(self)
        if not shards:
            return super().save_pretrained(save_directory, *args, **kwargs)
        # Sharded tables (table_parallel.py): a collective save. The main process writes everything else, then every
        # rank streams its own rows into one table file of the same standard checkpoint.
        if args or kwargs.get("state_dict") is not None or kwargs.get("push_to_hub"):
            raise ValueError("save_pretrained of a model with sharded Engram tables takes no state_dict and does not "
                             "push: every rank writes its own rows (call it on every rank), then push the folder.")
        is_main = kwargs.pop("is_main_process", torch.distributed.get_rank() == 0)
        state = self.state_dict()
        if any(isinstance(value, DTENSOR) for value in state.values()):
            # The rest is sharded by FSDP2: gathered a tensor at a time into rank 0's host memory (only rank 0 gets
            # it), so rank 0 writes it, whatever is_main_process says.
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            is_main = torch.distributed.get_rank() == 0
        state = {k: v for k, v in state.items() if k.rsplit(".", 1)[0] not in shards}
        if is_main:
            super().save_pretrained(save_directory, state_dict=state, **kwargs)
        save_table_shards(self, save_directory, is_main)

    def push_to_hub(self, repo_id: str, **kwargs):
        """transformers' push_to_hub; with the modeling_engram package installed, the commit also carries the Engram
        model card (see `modeling_engram.hub.push_to_hub` for the card options and `tokenizer=`)."""
        hub = _package_helper("hub")
        return super().push_to_hub(repo_id, **kwargs) if hub is None else hub.push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, plus Engram table placement.

        `engram_storage="host"|"disk"` (or a `device_map` from `engram_device_map`, or `device_map="auto"`) keeps
        the tables out of transformers' loader and Accelerate's hooks: they are read from the checkpoint files
        here (disk: memory-mapped), so no offload hook ever copies a whole table per forward.

        `engram_table_parallel=True` (or a process group) shards every table by rows over the ranks of the
        initialised process group (`table_parallel.shard_engram_tables`): each rank reads only its own rows.
        """
        if kwargs.get("use_safetensors") is False:
            raise ValueError("Engram checkpoints load from safetensors only (loading never unpickles); "
                             "drop use_safetensors=False.")
        kwargs["use_safetensors"] = True
        table_parallel = kwargs.pop("engram_table_parallel", False)
        if table_parallel:
            require_process_group()
        kwargs = resolve_table_placement(cls, args, kwargs)
        # The model transformers builds is told which tables `attach_checkpoint_tables` reads below (never whole).
        loaded = super().from_pretrained(*args, **kwargs, engram_loading="sharded" if table_parallel else "whole")
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if table_parallel:  # each rank takes its block of rows from the checkpoint below, never a whole table
            shard_engram_tables(model, group=None if table_parallel is True else table_parallel)
        attach_checkpoint_tables(model, getattr(model, "_engram_checkpoint_files", None))
        for table in model.modules():
            if isinstance(table, EngramTable) and table.scaled:
                table.weight.requires_grad_(False)  # transformers' loader makes every parameter trainable
        try:
            model.base_model.hasher.check_token_map()
        except ValueError as error:
            raise ValueError(f"checkpoint {args[0] if args else ''!s} does not match its config: {error}") from None
        return loaded

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs):
        # Private (pinned by tests/test_private_api.py): the one place that sees both the built model and the
        # checkpoint files before weights load; from_pretrained has no public hook between the two.
        check_checkpoint_tables(model, checkpoint_files)
        model._engram_checkpoint_files = checkpoint_files  # for `attach_checkpoint_tables`, after loading
        return PreTrainedModel._load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs)

    def engram_cache_stats(self) -> dict[int, dict[str, float]]:
        """Hot-row cache statistics per Engram layer (`engram_cache_rows > 0`)."""
        return {
            layer_id: self.base_model.layers[layer_id].engram.table.cache.stats()
            for layer_id in self.config.engram_layer_ids
            if self.base_model.layers[layer_id].engram.table.cache is not None
        }


class EngramModel(EngramPreTrainedModel):
    def __init__(self, config: EngramConfig, engram_loading: str | None = None):
        """`engram_loading` is set by `from_pretrained` for the model it loads ("whole" or "sharded"): the tables
        it names (`memory.rows_from_checkpoint`) are built without rows, read from the checkpoint files afterwards."""
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.hasher = EngramHasher(config)
        self.layers = nn.ModuleList(
            [EngramDecoderLayer(config, layer_idx, engram_loading) for layer_idx in range(config.num_hidden_layers)]
        )
        self.hc_head = HyperHead(config) if config.hc_mult > 1 else None
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def check_input_ids(self, input_ids: torch.LongTensor) -> None:
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids has shape {tuple(input_ids.shape)}; Engram needs a non-empty batch of token ids [B, T]."
            )
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids has dtype {input_ids.dtype}; token ids must be integers (torch.long).")
        if torch.compiler.is_compiling():
            return
        low, high = (int(v) for v in torch.aminmax(input_ids))
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"input_ids contains token id {bad}, outside the vocabulary [0, {self.vocab_size - 1}] "
                f"(vocab_size={self.vocab_size})."
            )
        if not self.hasher.token_map_checked:
            self.hasher.check_token_map()

    @staticmethod
    def refuse_swallowed_keywords(kwargs: dict, cache: Cache | None, input_ids: torch.Tensor | None) -> None:
        """Keywords of transformers 4.x or of encoder-decoders that `**kwargs` would otherwise swallow while the caller
        means them to change the call. A `cache_position` that states what the cache implies is accepted."""
        for name, why in (("head_mask", "transformers 5 removed head masking"),
                          ("encoder_hidden_states", "a decoder-only model has no cross-attention")):
            if kwargs.get(name) is not None:
                raise ValueError(f"{name} is not supported: {why}.")
        cache_position = kwargs.pop("cache_position", None)
        if cache_position is not None and input_ids is not None:
            past = cache.get_seq_length() if cache is not None else 0
            implied = torch.arange(past, past + input_ids.shape[1], device=cache_position.device)
            if not torch.equal(cache_position.reshape(-1), implied):
                raise ValueError(
                    f"cache_position {cache_position.tolist()} disagrees with the cache, which holds {past} tokens: "
                    "transformers 5 takes positions from the cache (pass position_ids for other positions)."
                )

    @staticmethod
    def document_positions(
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor | None,
        cu_seq_lens: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
    ) -> torch.LongTensor | None:
        """[B, T] index of every token inside its document, for sequences packed without padding (transformers'
        `DataCollatorWithFlattening`): from `cu_seq_lens_q` (document starts of a [1, T] row) or `seq_idx` (the
        document number of every token, [B, T]) when given, else from the caller's `position_ids`, which such
        collators restart at 0 at every document. None for none of them. Given together, they must agree."""
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device)
        if cu_seq_lens is not None:
            if batch != 1 or int(cu_seq_lens[-1]) != length:
                raise ValueError(
                    f"cu_seq_lens_q ends at {int(cu_seq_lens[-1])}, but packed input_ids must be one row of that "
                    f"length; they have shape {tuple(input_ids.shape)}."
                )
            starts = cu_seq_lens[:-1].to(device=input_ids.device, dtype=torch.long)
            documents = (positions - starts[torch.searchsorted(starts, positions, right=True) - 1]).unsqueeze(0)
            named = "cu_seq_lens_q"
        elif seq_idx is not None:
            if seq_idx.shape != input_ids.shape:
                raise ValueError(f"seq_idx has shape {tuple(seq_idx.shape)}; input_ids have {tuple(input_ids.shape)}.")
            starts = torch.ones_like(seq_idx, dtype=torch.bool)
            starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
            first = torch.where(starts, positions, 0).cummax(dim=1).values
            documents = positions - first
            named = "seq_idx"
        else:
            return None if position_ids is None else position_ids.expand(batch, -1)
        if position_ids is not None and not torch.equal(position_ids.expand(batch, -1), documents):
            raise ValueError(f"position_ids do not restart where {named} starts a new document.")
        return documents

    @staticmethod
    def restarts(doc_positions: torch.LongTensor) -> bool:
        """Whether a row holds more than one document (its positions restart somewhere)."""
        return bool((doc_positions[:, 1:] != doc_positions[:, :-1] + 1).any())

    def engram_hash_ids(
        self,
        input_ids: torch.LongTensor,
        token_mask: torch.Tensor | None,
        cache: Cache | None,
        doc_positions: torch.LongTensor | None = None,
    ) -> dict[int, torch.LongTensor]:
        """Hash ids of the new tokens for every Engram layer; the cache carries the last N-1 compressed ids."""
        if not self.config.engram_layer_ids:  # a baseline backbone without Engram (e.g. a pure MoE, rho = 1)
            return {}
        if cache is None:  # fresh sequences: token map, mask and hash in one kernel launch when Triton runs
            return self.hasher(input_ids, token_mask, doc_positions)
        compressed = self.hasher.compress(input_ids, token_mask)
        history = self.config.max_ngram_size - 1
        layer_ids = self.config.engram_layer_ids
        if cache.get_conv_state(layer_ids[0], TOKEN_STATE) is None:
            compressed = torch.cat([self.hasher.start_history(input_ids), compressed], dim=1)
        for layer_idx in layer_ids:  # every Engram layer's slot: transformers crops each conv-state slot of a layer
            tokens = cache.update_conv_state(
                compressed.unsqueeze(1), layer_idx, state_idx=TOKEN_STATE, conv_kernel_size=history
            )
        return self.hasher.hash_tokens(tokens.squeeze(1)[:, -(history + input_ids.shape[1]) :])

    def prefetch_rows(self, hash_ids: dict[int, torch.LongTensor]) -> dict[int, RowFetch]:
        """Start the row fetch of every table whose rows travel (host/disk) at once; each Engram layer waits only for
        its own."""
        if not self.config.engram_prefetch:
            return {}
        tables = {layer_id: self.layers[layer_id].engram.table for layer_id in hash_ids}
        return {
            layer_id: table.fetch(hash_ids[layer_id], asynchronous=True)
            for layer_id, table in tables.items() if table.storage.prefetches
        }

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # as transformers' own models: the 4.x name
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Token ids; required, because Engram hashes them. `inputs_embeds`, if given, replaces only the token
            embedding lookup.
        attention_mask (`torch.Tensor` of shape `(batch_size, past + sequence_length)`, *optional*):
            Padding positions (0) read the Engram pad id and feed zeros to the short conv.
        position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Without a cache, each token's index inside its document: padding-free packing restarts them at 0, and no
            n-gram or short-conv tap reaches back past that (`cu_seq_lens_q`, when given, states the same).
        """
        self.refuse_swallowed_keywords(kwargs, cache, input_ids)
        if input_ids is None:
            raise ValueError("EngramModel needs input_ids: Engram hashes token ids (inputs_embeds alone is not enough).")
        self.check_input_ids(input_ids)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        doc_positions = None
        if cache is None:  # packed documents (padding-free collators): n-grams and conv stop at their boundaries
            doc_positions = self.document_positions(
                input_ids, position_ids, kwargs.get("cu_seq_lens_q"), kwargs.get("seq_idx"))
            if position_ids is None:
                position_ids = doc_positions
            # No fresh cache in training or for a packed row: nothing continues from it, and transformers' masks see
            # packed rows (restarting position_ids) only without one.
            if use_cache and (self.training or (doc_positions is not None and self.restarts(doc_positions))):
                use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        mask_kwargs = dict(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                           cache=cache, position_ids=position_ids)
        masks = {"full_attention": create_causal_mask(**mask_kwargs)}
        if self.config.sliding_window is not None:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        token_mask = None
        if attention_mask is not None and attention_mask.ndim == 2:
            token_mask = attention_mask[:, -input_ids.shape[1] :]
        hash_ids = self.engram_hash_ids(input_ids, token_mask, cache, doc_positions)
        rows = self.prefetch_rows(hash_ids)

        hidden_states = inputs_embeds
        if self.config.hc_mult > 1:  # M copies of the embedding, [B, T, M, hidden]
            hidden_states = inputs_embeds.unsqueeze(2).repeat(1, 1, self.config.hc_mult, 1)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        for layer_idx, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=masks[self.config.attention_type(layer_idx)],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                engram_hash_ids=hash_ids,
                engram_token_mask=token_mask,
                engram_live_mask=self.hasher.live_mask(input_ids),
                engram_rows=rows,
                engram_doc_positions=doc_positions,
                **kwargs,
            )
        if self.hc_head is not None:
            hidden_states = self.hc_head(hidden_states.flatten(2))
        return MoeModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class EngramForCausalLM(EngramPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: EngramConfig, engram_loading: str | None = None):
        super().__init__(config)
        self.model = EngramModel(config, engram_loading)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_base_model(cls, base, tokenizer=None, engram_layer_ids: list[int] | None = None, **kwargs):
        """Add Engram memory to a pretrained Llama, Mistral, Qwen2 or Qwen3 causal LM (a loaded model, or a path /
        repo id with `from_pretrained` keywords such as `gguf_file=`); before training it computes the base model's
        function exactly. Engram fields (`n_head_per_ngram`, `engram_vocab_size`, ...) go in `kwargs`. See
        `modeling_engram.retrofit`."""
        retrofit = _required_helper("retrofit")
        return retrofit.from_base_model(base, tokenizer, engram_layer_ids, model_class=cls, **kwargs)

    @classmethod
    def from_engram_adapter(cls, adapter, base=None, **kwargs):
        """Load a compact Engram adapter (`save_engram_adapter` / `push_engram_adapter`: only the Engram tensors)
        over its base model, by default the one it records. See `modeling_engram.engram_adapter`."""
        return _required_helper("engram_adapter").from_engram_adapter(adapter, base, model_class=cls, **kwargs)

    def init_continuous_batching(self, *args, **kwargs):
        """Refused with a `ValueError` (`CONTINUOUS_BATCHING_REFUSAL`): the paged cache has no slot for Engram's state."""
        raise ValueError(CONTINUOUS_BATCHING_REFUSAL.format(name=type(self).__name__))

    def generate_batch(self, *args, **kwargs):
        """Refused like `init_continuous_batching`, at once (`generate(cache_implementation="paged")` lands here)."""
        raise ValueError(CONTINUOUS_BATCHING_REFUSAL.format(name=type(self).__name__))

    def prepare_inputs_for_generation(self, input_ids, inputs_embeds=None, **kwargs):
        """GenerationMixin's inputs, with the prompt's ids kept beside its embeddings on the first step (transformers
        drops them there; Engram hashes them)."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        embeds = model_inputs.get("inputs_embeds")
        if model_inputs.get("input_ids") is None and embeds is not None:
            if input_ids is None or input_ids.shape[1] < embeds.shape[1]:
                raise ValueError(
                    "generate(inputs_embeds=...) needs the input_ids they embed too (generate(input_ids=ids, "
                    "inputs_embeds=embeds)): Engram hashes the token ids."
                )
            model_inputs["input_ids"] = input_ids[:, -embeds.shape[1] :].clone(memory_format=torch.contiguous_format)
        return model_inputs

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Targets for the shifted next-token loss; -100 is ignored.
        """
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )


__all__ = ["EngramPreTrainedModel", "EngramModel", "EngramForCausalLM", "EngramDecoderLayer"]
