"""modeling_engram: DeepSeek's Engram conditional memory as a Hugging Face Transformers model family.

Importing this package registers `EngramConfig` (model_type "engram"), `EngramModel` and `EngramForCausalLM`
with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_engram import EngramConfig
from .hashing import EngramHasher
from .modeling_engram import EngramForCausalLM, EngramModel, EngramPreTrainedModel
from .placement import engram_device_map
from .token_map import build_token_map

AutoConfig.register(EngramConfig.model_type, EngramConfig, exist_ok=True)
AutoModel.register(EngramConfig, EngramModel, exist_ok=True)
AutoModelForCausalLM.register(EngramConfig, EngramForCausalLM, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "EngramConfig",
    "EngramHasher",
    "EngramModel",
    "EngramForCausalLM",
    "EngramPreTrainedModel",
    "build_token_map",
    "engram_device_map",
]
