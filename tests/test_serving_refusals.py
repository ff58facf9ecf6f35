"""Serving stacks that would run an Engram model wrongly refuse it, clearly, through every calling convention:
vLLM's (and SGLang's) Transformers backend, and transformers' continuous batching. transformers' own server cannot
load it (a claim docs/serving.md makes; this file checks it still holds)."""

import pytest
import torch
import transformers
from conftest import make_tiny_tokenizer, tiny_model
from transformers import GenerationConfig
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from modeling_engram import EngramForCausalLM, EngramModel

PACKED = "not compatible with vLLM's Transformers backend"
PAGED = r"continuous batching.*no slot for an Engram layer's per-request token history and short-conv state"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engram")
    tiny_model().save_pretrained(folder)
    return folder


def vllm_model_classes(folder) -> list[type]:
    """The classes vLLM's registry (`_try_resolve_transformers`) checks for a checkpoint: `transformers.<arch>` if it
    exists, else every `AutoModel*` class of the config's auto_map, from the checkpoint's own code."""
    config = transformers.AutoConfig.from_pretrained(folder)
    assert getattr(transformers, config.architectures[0], None) is None
    return [get_class_from_dynamic_module(ref, str(folder)) for name, ref in config.auto_map.items()
            if name.startswith("AutoModel")]


def vllm_accepts(model_class: type) -> bool:
    """vLLM's check before its Transformers backend runs a remote-code model."""
    return model_class.is_backend_compatible() or model_class._can_set_attn_implementation()


def test_vllm_registry_check_refuses_engram_classes(saved):
    remote = vllm_model_classes(saved)
    assert {cls.__name__ for cls in remote} == {"EngramModel", "EngramForCausalLM"}
    for model_class in [EngramModel, EngramForCausalLM, *remote]:
        with pytest.raises(ValueError, match=PACKED) as refusal:
            vllm_accepts(model_class)
        assert "engram-serve" in str(refusal.value) and model_class.__name__ in str(refusal.value)
        assert model_class._supports_attention_backend is False
        assert model_class._can_set_attn_implementation() is False  # a vLLM that asks only this refuses too


@torch.no_grad()
def test_attention_can_still_be_switched():
    """What the vLLM refusal must not cost: `set_attn_implementation` switches and computes the same logits."""
    model = tiny_model()
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    eager = model(ids).logits
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    assert model.model.layers[0].self_attn.config._attn_implementation == "sdpa"
    torch.testing.assert_close(model(ids).logits, eager, atol=1e-5, rtol=0)
    assert EngramForCausalLM._can_set_attn_implementation() is False  # only inside the call


CONTINUOUS_BATCHING_CALLS = {
    "generate_batch": lambda m: m.generate_batch([[5, 6, 7], [8, 9]], generation_config=GenerationConfig(
        max_new_tokens=3, eos_token_id=2), warmup=False),
    "init_continuous_batching": lambda m: m.init_continuous_batching(),
    "continuous_batching_context_manager": lambda m: m.continuous_batching_context_manager(warmup=False).__enter__(),
    "generate_paged": lambda m: m.generate(torch.tensor([[5, 6, 7]]), cache_implementation="paged", max_new_tokens=3),
}


@pytest.mark.parametrize("call", list(CONTINUOUS_BATCHING_CALLS), ids=list(CONTINUOUS_BATCHING_CALLS))
def test_continuous_batching_refuses_with_the_alternatives(call):
    with pytest.raises(ValueError, match=PAGED) as refusal:
        CONTINUOUS_BATCHING_CALLS[call](tiny_model())
    message = str(refusal.value)
    assert "left-padded" in message and "engram-serve" in message


def test_continuous_batching_refuses_remote_code_too(saved):
    """The checkpoint's own code, as `trust_remote_code=True` runs it where this package is not installed."""
    remote_class = get_class_from_dynamic_module(transformers.AutoConfig.from_pretrained(saved).auto_map[
        "AutoModelForCausalLM"], str(saved))
    assert remote_class.__module__.startswith("transformers_modules")
    model = remote_class.from_pretrained(saved)
    with pytest.raises(ValueError, match=PAGED):
        model.generate_batch([[5, 6, 7]], generation_config=GenerationConfig(max_new_tokens=3), warmup=False)


def test_transformers_serve_cannot_load_engram(saved):
    """docs/serving.md says `transformers serve` cannot load Engram models (it resolves `getattr(transformers,
    architectures[0])`), which is why engram-serve exists. If this fails, transformers can: reconsider."""
    model_manager = pytest.importorskip("transformers.cli.serving.model_manager")
    make_tiny_tokenizer().save_pretrained(saved)
    loader_class = getattr(model_manager, "ModelLoader", None) or model_manager.ModelManager  # 5.25 / 5.24
    loader = loader_class(device="cpu", trust_remote_code=True)
    with pytest.raises(AttributeError, match="has no attribute EngramForCausalLM"):
        loader._load_model(str(saved))
