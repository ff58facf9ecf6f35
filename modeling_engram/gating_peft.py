"""Gating-only fine-tuning: train exactly the parameters that compute Engram's gate alpha, everything else frozen.

The gate of branch m is alpha_m = sigmoid(signed_sqrt(RMSNorm_q(h_m) . RMSNorm_k(W_K^(m) e) / sqrt(d))): its own
parameters are the branch keys W_K (`kv_proj.key_weight`, all branches stacked; a parameter of the one matmul that
also computes the shared value) and the query/key RMSNorm weights. `EngramLayer.gating_key_parameters` and
`EngramLayer.gating_norms` name them by role; everything here reads those.

- `gating_peft_config(lora_r=8)`: a PEFT `LoraConfig` with LoRA on the keys (PEFT's `target_parameters`, since the
  keys share a module with the value) and the two norms trained in full (`modules_to_save`).
- `train_only_gating(model)`: the same parameters trained in full, without PEFT (everything else frozen).

PEFT trains whole modules or, through LoRA's `target_parameters`, single parameters; a full-rank copy of the keys
alone is therefore not expressible as a PEFT config, and PEFT has no per-model default for `target_parameters`, so a
bare `LoraConfig()` cannot find them either: use `gating_peft_config`.
"""

from torch import nn

from .engram_layer import EngramLayer

ENGRAM_ATTRIBUTE = "engram"  # EngramDecoderLayer.engram holds the EngramLayer


def gating_parameter_names(model: nn.Module) -> list[str]:
    """Full names of every gating parameter of `model`: per Engram layer the branch keys and the query/key norms."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, EngramLayer):
            names += [f"{name}.{key}" for key in module.gating_key_parameters]
            for norm in module.gating_norms:
                names += [f"{name}.{norm}.{param}" for param, _ in module.get_submodule(norm).named_parameters()]
    return names


def train_only_gating(model: nn.Module) -> list[str]:
    """Freeze every parameter of `model` except the gating ones, which train in full; returns their names."""
    gating = set(gating_parameter_names(model))
    if not gating:
        raise ValueError("train_only_gating: the model has no Engram layer, so no gating parameters.")
    for name, param in model.named_parameters():
        param.requires_grad_(name in gating)
    return sorted(gating)


def gating_peft_config(lora_r: int = 8, lora_alpha: int | None = None, **kwargs):
    """A PEFT `LoraConfig` under which exactly the gating parameters of an Engram model train.

    LoRA of rank `lora_r` (`lora_alpha` defaults to `lora_r`) on every Engram layer's branch keys, and the query/key
    RMSNorms trained in full. Other keyword arguments go to `LoraConfig` (e.g. `inference_mode=True`); LoRA on a
    parameter supports no dropout.

        model = get_peft_model(model, gating_peft_config())
        model.print_trainable_parameters()
    """
    from peft import LoraConfig, TaskType

    if lora_r < 1:
        raise ValueError(f"lora_r={lora_r} is invalid; it must be >= 1.")
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora_r,
        lora_alpha=lora_r if lora_alpha is None else lora_alpha,
        target_modules=[],
        target_parameters=[f"{ENGRAM_ATTRIBUTE}.{key}" for key in EngramLayer.gating_key_parameters],
        modules_to_save=[f"{ENGRAM_ATTRIBUTE}.{norm}" for norm in EngramLayer.gating_norms],
        **kwargs,
    )


__all__ = ["gating_parameter_names", "gating_peft_config", "train_only_gating"]
