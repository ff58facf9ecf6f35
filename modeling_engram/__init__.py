"""modeling_engram: DeepSeek's Engram conditional memory as a Hugging Face Transformers model family.

Importing this package registers `EngramConfig` (model_type "engram"), `EngramModel` and `EngramForCausalLM`
with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`, and, where PEFT is installed, the gating projections
as LoRA's default targets for Engram models. The training helpers (`create_engram_optimizer`, `EngramTrainer`,
`text_blocks_dataset`) load on first use, since loading a model needs none of them.
"""

import importlib

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_engram import EngramConfig
from .gating_peft import gating_module_names, gating_parameter_names, gating_peft_config, register_peft_defaults
from .hashing import EngramHasher
from .modeling_engram import EngramForCausalLM, EngramModel, EngramPreTrainedModel
from .token_map import build_token_map

AutoConfig.register(EngramConfig.model_type, EngramConfig, exist_ok=True)
AutoModel.register(EngramConfig, EngramModel, exist_ok=True)
AutoModelForCausalLM.register(EngramConfig, EngramForCausalLM, exist_ok=True)
register_peft_defaults()

__version__ = "0.1.0"

_LAZY = {
    "EngramAdamW": ".training",
    "EngramTrainer": ".training",
    "create_engram_optimizer": ".training",
    "set_sparse_table_grads": ".training",
    "table_optimizer_state_bytes": ".training",
    "text_blocks_dataset": ".data",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EngramConfig",
    "EngramHasher",
    "EngramModel",
    "EngramForCausalLM",
    "EngramPreTrainedModel",
    "build_token_map",
    "gating_module_names",
    "gating_parameter_names",
    "gating_peft_config",
    *_LAZY,
]
