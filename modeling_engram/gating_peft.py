"""Gating-only fine-tuning with PEFT: train exactly the parameters that compute Engram's gate alpha.

The gate of branch m is alpha_m = sigmoid(signed_sqrt(RMSNorm_q(h_m) . RMSNorm_k(W_K^(m) e) / sqrt(d))): its own
parameters are the key projections W_K (`kv_proj.key_proj`, all branches in one matrix) and the query/key RMSNorm weights.
`EngramLayer.gating_projections` and `EngramLayer.gating_norms` name them by role; everything here reads those.

- `gating_peft_config()`: full training of exactly those modules (PEFT's LN-tuning method, which trains a copy of
  each target module: here the key projections and both norms; `merge_and_unload()` swaps the copies in).
- `gating_peft_config(lora_r=8)`: LoRA on the key projections, the two norms trained in full (`modules_to_save`).
- `LoraConfig()` without `target_modules` on an Engram model targets the key projections (registered on import).
"""

import re
import warnings

from torch import nn

from .engram_layer import EngramLayer

ENGRAM_ATTRIBUTE = "engram"  # EngramDecoderLayer.engram holds the EngramLayer


def gating_module_names(model: nn.Module) -> list[str]:
    """Full names of every Engram layer's gating modules (key projections, query and key RMSNorms)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, EngramLayer):
            names += [f"{name}.{child}" for child in (*module.gating_projections, *module.gating_norms)]
    return names


def gating_parameter_names(model: nn.Module) -> list[str]:
    """Full names of every gating parameter of `model`."""
    prefixes = tuple(f"{name}." for name in gating_module_names(model))
    return [name for name, _ in model.named_parameters() if name.startswith(prefixes)]


def _module_pattern(children: tuple[str, ...]) -> str:
    """A PEFT `target_modules` regex (matched in full) for the given children of every Engram layer."""
    return rf".*\.{ENGRAM_ATTRIBUTE}\.({'|'.join(re.escape(child) for child in children)})"


def gating_peft_config(
    lora_r: int | None = None, lora_alpha: int | None = None, lora_dropout: float = 0.0, **kwargs
):
    """A PEFT config under which exactly the gating parameters of an Engram model train.

    `lora_r=None` (default): `LNTuningConfig` that trains the key projections and the query/key RMSNorms in full.
    `lora_r=r`: `LoraConfig` with rank r on the key projections (`lora_alpha` defaults to r) and the two norms in
    `modules_to_save`. Other keyword arguments go to the config (e.g. `inference_mode=True`).

        model = get_peft_model(model, gating_peft_config())
        model.print_trainable_parameters()
    """
    from peft import LNTuningConfig, LoraConfig, TaskType

    _quiet_peft_about_branch_norms()
    projections, norms = EngramLayer.gating_projections, EngramLayer.gating_norms
    if lora_r is None:
        if lora_alpha is not None or lora_dropout:
            raise ValueError("lora_alpha and lora_dropout apply only with lora_r (the LoRA variant).")
        return LNTuningConfig(task_type=TaskType.CAUSAL_LM, target_modules=_module_pattern(projections + norms), **kwargs)
    if lora_r < 1:
        raise ValueError(f"lora_r={lora_r} is invalid; it must be >= 1 (or None for full gating training).")
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora_r,
        lora_alpha=lora_r if lora_alpha is None else lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=_module_pattern(projections),
        modules_to_save=[f"{ENGRAM_ATTRIBUTE}.{norm}" for norm in norms],
        **kwargs,
    )


def _quiet_peft_about_branch_norms() -> None:
    """Drop PEFT's "Unsupported layer type BranchRMSNorm" warning, and only that one.

    LN-tuning asks every target for in/out features (`_get_in_out_features`), which it only stores; norms have none,
    so PEFT warns for every norm it tunes, its own `nn.LayerNorm` included, though the copy it trains works.
    """
    warnings.filterwarnings("ignore", message=r"Unsupported layer type '<class '[\w.]*\.BranchRMSNorm'>'",
                            category=UserWarning, module=r"peft\.tuners\.tuners_utils")


def register_peft_defaults() -> bool:
    """Make PEFT's `LoraConfig()` without `target_modules` target the gating projections on model_type "engram".

    Returns False where PEFT is not installed.
    """
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    except ImportError:
        return False
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault("engram", list(EngramLayer.gating_projections))
    return True


__all__ = ["gating_module_names", "gating_parameter_names", "gating_peft_config", "register_peft_defaults"]
