"""modeling_engram: DeepSeek's Engram conditional memory as a Hugging Face Transformers model family.

Importing this package registers `EngramConfig` (model_type "engram"), `EngramModel` and `EngramForCausalLM`
with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`, and marks them for code export: `save_pretrained` writes
an `auto_map` and copies the model code, so the folder loads with `trust_remote_code=True` where this package is not
installed. Where PEFT is installed, it also makes the gating projections LoRA's default targets on Engram models.
The training and retrofit helpers (`create_engram_optimizer`, `EngramTrainer`, `text_blocks_dataset`,
`freeze_backbone`, `save_engram_adapter`, ...) load on first use, since loading a model needs none of them.
"""

import importlib

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_engram import DEEPSEEK_V41_ENGRAM, EngramConfig
from .gating_peft import gating_module_names, gating_parameter_names, gating_peft_config, register_peft_defaults
from .hashing import EngramHasher
from .hub import exported_code_files, model_card, push_to_hub
from .modeling_engram import EngramForCausalLM, EngramModel, EngramPreTrainedModel
from .placement import engram_device_map
from .row_formats import ROW_FORMATS
from .sharded_training import shard_engram_model  # importing it registers the stale-optimizer check
from .table_parallel import shard_engram_tables
from .token_map import build_token_map

AutoConfig.register(EngramConfig.model_type, EngramConfig, exist_ok=True)
AutoModel.register(EngramConfig, EngramModel, exist_ok=True)
AutoModelForCausalLM.register(EngramConfig, EngramForCausalLM, exist_ok=True)
EngramConfig.register_for_auto_class("AutoConfig")
EngramModel.register_for_auto_class("AutoModel")
EngramForCausalLM.register_for_auto_class("AutoModelForCausalLM")
register_peft_defaults()

__version__ = "0.1.0"

_LAZY = {
    "EngramAdamW": ".training",
    "EngramTrainer": ".training",
    "create_engram_optimizer": ".training",
    "set_sparse_table_grads": ".training",
    "table_optimizer_state_bytes": ".training",
    "text_blocks_dataset": ".data",
    "texts_blocks_dataset": ".data",
    "gate_heatmap": ".visualize",
    "backbone_lora_config": ".retrofit",
    "from_engram_adapter": ".engram_adapter",
    "freeze_backbone": ".retrofit",
    "push_engram_adapter": ".engram_adapter",
    "save_engram_adapter": ".engram_adapter",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEEPSEEK_V41_ENGRAM",
    "ROW_FORMATS",
    "EngramConfig",
    "EngramHasher",
    "EngramModel",
    "EngramForCausalLM",
    "EngramPreTrainedModel",
    "build_token_map",
    "engram_device_map",
    "exported_code_files",
    "gating_module_names",
    "gating_parameter_names",
    "gating_peft_config",
    "model_card",
    "push_to_hub",
    "shard_engram_model",
    "shard_engram_tables",
    *_LAZY,
]
