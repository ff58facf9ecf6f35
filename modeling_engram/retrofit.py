"""Retrofit: Engram memory for a pretrained causal LM, exact before training, and its training modes.

`from_base_model(base, tokenizer, engram_layer_ids=[...], **engram_fields)` (also `EngramForCausalLM.from_base_model`)
turns a pretrained Llama, Mistral, Qwen2 or Qwen3 model into an `EngramForCausalLM`:

- The backbone is the base model's own tensors, taken over, not copied: the Engram model is built on the meta device
  and the base's tensors are assigned into it, so nothing is allocated twice. Like `peft.get_peft_model`, the result
  shares them with `base` (training the backbone changes both).
- The families differ only in config (q/k/v and output biases, q/k norms, sliding windows, tied embeddings, RoPE
  scaling), so `EngramConfig` expresses each of them and one backbone runs all; the parameter names are the families'
  own, so the state dict maps one to one. Anything the config cannot express is refused, never approximated: a key
  set or shape that differs, and a probe forward whose logits differ from the base's.
- Every Engram layer's value projection starts at zero, so the layer adds exactly 0 and the model computes the base
  model's function bit for bit. Its gradient is not zero (alpha * dL/du * e^T), so the first step moves it, and the
  tables, keys and conv learn from the second step on (the zero-init of LoRA's B and ControlNet's convs).

The compact form of a retrofitted model, only its Engram tensors over a named base, is `engram_adapter.py`.
"""

import copy
from pathlib import Path

import torch
from torch import nn

from .configuration_engram import EngramConfig
from .engram_layer import EngramLayer
from .memory import EngramTable
from .modeling_engram import EngramForCausalLM
from .token_map import build_token_map

EXACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Largest |logit| difference the probe forward tolerates per dtype (the paths are the same ops: 0 is expected).
PROBE_TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 0.0, torch.float16: 0.0}
# Fields every supported family shares with EngramConfig under the same name and meaning.
SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_dropout",
)
# model_type -> (architecture, the family's attention variant in EngramConfig's terms).
FAMILIES = {
    "llama": ("LlamaForCausalLM", lambda c: dict(attention_bias=c.attention_bias, mlp_bias=c.mlp_bias)),
    "mistral": ("MistralForCausalLM", lambda c: dict(sliding_window=c.sliding_window)),
    "qwen2": ("Qwen2ForCausalLM", lambda c: dict(
        attention_bias=True, attention_output_bias=False, sliding_window=c.sliding_window,
        layer_types=list(c.layer_types))),
    "qwen3": ("Qwen3ForCausalLM", lambda c: dict(
        attention_bias=c.attention_bias, qk_norm=True, sliding_window=c.sliding_window,
        layer_types=list(c.layer_types))),
}
ENGRAM_FIELD_PREFIX = "engram_"
ENGRAM_FIELDS = ("max_ngram_size", "n_head_per_ngram", "n_embed_per_ngram")
BACKBONE_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_engram_key(name: str) -> bool:
    """Whether a state-dict key belongs to Engram (layers' `engram.*`, the hasher's token map), not the backbone."""
    return ".engram." in f".{name}" or ".hasher." in f".{name}"


def supported_architectures() -> list[str]:
    return [architecture for architecture, _ in FAMILIES.values()]


def check_base_model(base: nn.Module) -> None:
    """Raise a ValueError unless `base` is a causal LM of a supported family, in a dtype we take over exactly."""
    if type(base).__name__.startswith("Peft"):
        raise ValueError(
            f"base is a PEFT model ({type(base).__name__}); merge its adapters first (`base.merge_and_unload()`)."
        )
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    architecture = type(base).__name__
    if model_type not in FAMILIES or FAMILIES[model_type][0] != architecture:
        raise ValueError(
            f"cannot retrofit {architecture} (model_type {model_type!r}); supported architectures: "
            f"{', '.join(supported_architectures())}."
        )
    quantization = getattr(base.config, "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(
        quantization, "quant_method", None)
    method = getattr(method, "value", method)
    if quantization is not None and method != "gguf":  # GGUF checkpoints are de-quantized to float on load
        raise ValueError(
            f"base model is quantized (quant_method={method!r}); its weights cannot be taken over exactly. Load it "
            "without quantization (fp32, bf16 or fp16) to retrofit it."
        )
    dtypes = {p.dtype for p in base.parameters()}
    if not dtypes <= set(EXACT_DTYPES) or len(dtypes) != 1:
        raise ValueError(
            f"base model parameters have dtype(s) {sorted(map(str, dtypes))}; a retrofit takes over one of "
            f"{[str(d) for d in EXACT_DTYPES]} for every parameter (convert with `base.to(dtype)`)."
        )
    devices = {p.device for p in base.parameters()}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        raise ValueError(
            f"base model parameters live on {sorted(map(str, devices))}; load it on one device (no offload), "
            "retrofit it, then place the result (save_pretrained, then from_pretrained with device_map)."
        )


def backbone_fields(base_config) -> dict:
    """EngramConfig's backbone fields for a supported family's config."""
    fields = {name: getattr(base_config, name) for name in SHARED_FIELDS}
    fields["head_dim"] = getattr(base_config, "head_dim", None) or base_config.hidden_size // (
        base_config.num_attention_heads)
    fields["rope_parameters"] = copy.deepcopy(dict(base_config.rope_parameters))
    fields.update(FAMILIES[base_config.model_type][1](base_config))
    return fields


def base_fingerprint(model: nn.Module) -> list[float]:
    """A few backbone weights as floats: enough to tell another base (or another quantisation of it) apart."""
    inner = model.model
    parts = [inner.embed_tokens.weight[:4, :8], inner.norm.weight[:8], inner.layers[0].self_attn.q_proj.weight[:2, :8]]
    return [round(float(v), 6) for part in parts for v in part.detach().float().flatten().cpu()]


def _split_engram_fields(kwargs: dict) -> tuple[dict, dict]:
    engram = {k: v for k, v in kwargs.items() if k.startswith(ENGRAM_FIELD_PREFIX) or k in ENGRAM_FIELDS}
    return engram, {k: v for k, v in kwargs.items() if k not in engram}


def load_base_model(base, tokenizer=None, load_tokenizer: bool = True, **from_pretrained_kwargs):
    """(model, tokenizer, provenance) from a loaded model or a path / repo id (with `gguf_file=` etc.); the tokenizer
    is loaded from the same path when none is given and `load_tokenizer`."""
    if isinstance(base, (str, Path)):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        provenance = {"name_or_path": str(base)}
        provenance.update({k: from_pretrained_kwargs[k] for k in ("gguf_file", "revision", "subfolder")
                           if from_pretrained_kwargs.get(k) is not None})
        if tokenizer is None and load_tokenizer:
            hub_keys = ("gguf_file", "revision", "subfolder", "cache_dir", "token", "local_files_only")
            tokenizer = AutoTokenizer.from_pretrained(
                base, **{k: from_pretrained_kwargs[k] for k in hub_keys if k in from_pretrained_kwargs})
        return AutoModelForCausalLM.from_pretrained(base, **from_pretrained_kwargs), tokenizer, provenance
    if from_pretrained_kwargs:
        raise TypeError(
            f"from_base_model got {sorted(from_pretrained_kwargs)}: neither Engram fields (engram_*, "
            f"{', '.join(ENGRAM_FIELDS)}) nor usable, since base is a loaded model (from_pretrained keywords apply "
            "only when base is a path or repo id)."
        )
    return base, tokenizer, {"name_or_path": getattr(base.config, "_name_or_path", None) or None}


def from_base_model(
    base,
    tokenizer=None,
    engram_layer_ids: list[int] | None = None,
    *,
    model_class: type[EngramForCausalLM] = EngramForCausalLM,
    **kwargs,
) -> EngramForCausalLM:
    """Add Engram memory at `engram_layer_ids` to a pretrained causal LM; before training it equals the base exactly.

    Args:
        base: a loaded `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM` or `Qwen3ForCausalLM` (fp32, bf16
            or fp16, on one device), or a path / repo id loaded with `AutoModelForCausalLM.from_pretrained`.
        tokenizer: the base model's tokenizer; it builds the Engram token map. Loaded from `base` when that is a path.
        engram_layer_ids: decoder layers that get Engram (an early layer is the paper's best single choice).
        **kwargs: Engram fields of `EngramConfig` (`max_ngram_size`, `n_head_per_ngram`, `n_embed_per_ngram`,
            `engram_vocab_size`, `engram_storage`, ...); with a path, the other keywords go to `from_pretrained`
            (`gguf_file=`, `dtype=`, `revision=`, ...).
    """
    engram_fields, from_pretrained_kwargs = _split_engram_fields(kwargs)
    base, tokenizer, provenance = load_base_model(base, tokenizer, **from_pretrained_kwargs)
    check_base_model(base)
    if tokenizer is None:
        raise ValueError("from_base_model needs the base model's tokenizer (it builds the Engram token map).")
    layers = base.config.num_hidden_layers
    if not engram_layer_ids or any(not 0 <= int(i) < layers for i in engram_layer_ids):
        raise ValueError(
            f"engram_layer_ids={engram_layer_ids!r} is invalid for {type(base).__name__} with {layers} layers: give "
            f"one or more layer ids in [0, {layers - 1}]."
        )
    vocab_size = base.config.vocab_size
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the base model's embedding has vocab_size={vocab_size} "
            "rows: it is not this model's tokenizer."
        )
    if engram_fields.get("engram_storage") == "disk":
        raise ValueError(
            "engram_storage='disk' maps tables from a saved checkpoint; a retrofit makes new tables. Retrofit with "
            "'device' or 'host', save_pretrained, then from_pretrained(..., engram_storage='disk')."
        )
    token_map, compressed_vocab_size = build_token_map(tokenizer, vocab_size=vocab_size)
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    config = EngramConfig(
        **backbone_fields(base.config),
        engram_layer_ids=[int(i) for i in engram_layer_ids],
        engram_compressed_vocab_size=compressed_vocab_size,
        **{"engram_pad_id": pad_id, **engram_fields},
    )
    model = build_over_base(base, config, model_class)
    model.set_token_map(token_map)
    for module in model.modules():
        if isinstance(module, EngramLayer):  # zero memory output at step 0, with a non-zero gradient
            nn.init.zeros_(module.kv_proj.value_proj.weight)
    model.config.engram_base_model = {
        **provenance, "architecture": type(base).__name__, "dtype": str(model.dtype).removeprefix("torch."),
        "fingerprint": base_fingerprint(model),
    }
    check_equals_base(model, base)
    return model


def _materialize(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give every tensor still on the meta device (Engram's, non-persistent buffers) real, uninitialised memory.

    Parameters take `dtype` (the base's), except tables with an `engram_row_format`; buffers keep the dtype they
    were built with (RoPE's inv_freq stays fp32, as in the base)."""
    for module in model.modules():
        table = module if isinstance(module, EngramTable) else None
        own_dtype = table is not None and table.format is not None
        for registry in (module._parameters, module._buffers):
            for name, tensor in registry.items():
                if tensor is None or not tensor.is_meta:
                    continue
                parameter = registry is module._parameters
                kind = dtype if parameter and not own_dtype else tensor.dtype
                if table is not None:  # where its storage keeps rows (host: CPU memory, pinned when CUDA is present)
                    value = table.storage.empty(tensor.shape, kind, device)
                else:
                    value = torch.empty(tensor.shape, dtype=kind, device=device)
                registry[name] = nn.Parameter(value, tensor.requires_grad) if parameter else value


def build_over_base(base: nn.Module, config: EngramConfig, model_class: type[EngramForCausalLM]) -> EngramForCausalLM:
    """An Engram model whose backbone tensors are `base`'s (assigned, not copied); Engram tensors initialised."""
    parameter = next(base.parameters())
    config.dtype = parameter.dtype
    config._attn_implementation = base.config._attn_implementation
    with torch.device("meta"):
        model = model_class(config)
    expected = {name: t for name, t in model.state_dict().items() if not is_engram_key(name)}
    given = base.state_dict()
    missing, unexpected = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
    shapes = [f"{k}: {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
              for k in sorted(expected.keys() & given.keys()) if given[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{type(base).__name__} cannot be taken over exactly: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shapes {shapes[:5]}."
        )
    model.load_state_dict(given, strict=False, assign=True)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in given:
            tensor._is_hf_initialized = True
    _materialize(model, parameter.device, parameter.dtype)
    model.initialize_weights()
    model.tie_weights()
    model.generation_config = copy.deepcopy(base.generation_config)
    return model.train(base.training)


@torch.no_grad()
def check_equals_base(model: EngramForCausalLM, base: nn.Module, length: int = 16) -> None:
    """Raise a ValueError unless `model`'s logits equal `base`'s on a probe sequence (within PROBE_TOLERANCE)."""
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(model.config.vocab_size, (1, length), generator=generator).to(model.device)
    training = model.training, base.training
    model.eval(), base.eval()
    try:
        difference = float((model(probe).logits.float() - base(probe).logits.float()).abs().max())
    finally:
        model.train(training[0]), base.train(training[1])
    if difference > PROBE_TOLERANCE[model.dtype]:
        raise ValueError(
            f"the retrofitted model's logits differ from {type(base).__name__}'s by {difference:.3g} "
            f"(allowed {PROBE_TOLERANCE[model.dtype]}): its config holds something EngramConfig does not express."
        )


def engram_parameter_names(model: nn.Module) -> list[str]:
    """Names of the Engram parameters of `model` (tables, key/value projections, norms, conv)."""
    return [name for name, _ in model.named_parameters() if is_engram_key(name)]


def freeze_backbone(model: nn.Module) -> int:
    """Engram-only training: every parameter outside Engram stops requiring grad. Returns the trainable count."""
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad_(is_engram_key(name))
        trainable += param.numel() if param.requires_grad else 0
    return trainable


def backbone_lora_config(
    r: int = 8,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.0,
    target_modules: tuple[str, ...] = BACKBONE_LINEARS,
    train_engram: bool = True,
    **kwargs,
):
    """A PEFT `LoraConfig` with LoRA on the backbone's linear layers (never Engram's), and with `train_engram` the
    Engram layers trained in full alongside (`modules_to_save`: PEFT trains a copy of each, so their tables are held
    twice while wrapped; `merge_and_unload()` swaps the trained copies in)."""
    from peft import LoraConfig, TaskType

    pattern = rf".*\.layers\.\d+\.(?:self_attn|mlp)\.(?:{'|'.join(target_modules)})"
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=r if lora_alpha is None else lora_alpha,
        lora_dropout=lora_dropout, target_modules=pattern, modules_to_save=["engram"] if train_engram else None,
        **kwargs,
    )


__all__ = [
    "backbone_fields",
    "backbone_lora_config",
    "build_over_base",
    "check_base_model",
    "engram_parameter_names",
    "freeze_backbone",
    "from_base_model",
    "load_base_model",
    "supported_architectures",
]
