"""Gating-only fine-tuning with PEFT: exactly the gating parameters train, adapters save, load and merge."""

import re
import warnings

import pytest
import torch
from conftest import require, tiny_model
from transformers import AutoModelForCausalLM

require("peft")
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model  # noqa: E402

from modeling_engram import gating_module_names, gating_parameter_names, gating_peft_config

GATING = [f"model.layers.{i}.engram.{m}.weight" for i in (0, 2) for m in ("kv_proj.key_proj", "query_norm", "key_norm")]


def ids(batch=2, length=11, seed=0):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def base_name(name: str) -> str:
    """The base-model parameter a PEFT parameter adapts: strip PEFT's prefix and adapter levels."""
    name = name.removeprefix("base_model.model.")
    name = re.sub(r"\.(ln_tuning_layers|modules_to_save)\.default", "", name)
    return re.sub(r"\.(lora_A|lora_B)\.default\.weight$", ".weight", name)


def test_gating_parameters_are_the_key_projections_and_the_query_key_norms():
    model = tiny_model(hc_mult=4)
    assert sorted(gating_parameter_names(model)) == sorted(GATING)
    assert model.model.layers[0].engram.kv_proj.key_proj.weight.shape == (4 * 32, 32)  # every branch's key, one matrix
    assert model.model.layers[0].engram.query_norm.weight.shape == (4, 32)
    pattern = gating_peft_config().target_modules
    matched = [name for name, _ in model.named_modules() if re.fullmatch(pattern, name)]
    assert sorted(matched) == sorted(gating_module_names(model))


@pytest.mark.parametrize("lora_r", [None, 4], ids=["full-gating", "lora"])
def test_gating_only_fine_tuning_changes_only_the_gating(tmp_path, lora_r, capsys):
    tiny_model(hc_mult=4).save_pretrained(tmp_path / "base")
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), gating_peft_config(lora_r=lora_r))

    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert {base_name(name) for name in trainable} == set(GATING)
    if lora_r is None:
        expected_count = sum(original[name].numel() for name in GATING)
    else:
        expected_count = sum(original[n].numel() for n in GATING if "norm" in n) + 2 * 4 * (32 + 4 * 32)
    assert sum(p.numel() for p in trainable.values()) == expected_count
    model.print_trainable_parameters()
    assert f"trainable params: {expected_count:,}" in capsys.readouterr().out

    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.0)
    model.train()
    for step in range(3):
        batch = ids(seed=step)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    batch = ids(seed=9)
    with torch.no_grad():
        adapted = model(input_ids=batch).logits

    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
        assert torch.equal(reloaded.eval()(input_ids=batch).logits, adapted)
        auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
        assert torch.equal(auto.eval()(input_ids=batch).logits, adapted)

        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=batch).logits, adapted, atol=1e-6, rtol=1e-6)
    merged_state = merged.state_dict()
    assert merged_state.keys() == original.keys()
    for name, tensor in original.items():
        if name in GATING:
            assert not torch.equal(merged_state[name], tensor), f"{name} did not train"
        else:
            assert torch.equal(merged_state[name], tensor), f"{name} changed"


def test_gating_peft_config_is_free_of_the_norm_warning_peft_gives_otherwise():
    from peft import LNTuningConfig

    pattern = gating_peft_config().target_modules  # its filter now sits behind the "always" below
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(tiny_model(), LNTuningConfig(target_modules=pattern))
        config = gating_peft_config()  # installs its filter, in front of "always"
        assert sum("Unsupported layer type" in str(w.message) for w in caught) == 4  # two norms in each of 2 layers
        caught.clear()
        get_peft_model(tiny_model(), config)
    assert [str(w.message) for w in caught if "Unsupported layer type" in str(w.message)] == []


def test_lora_config_without_target_modules_targets_the_gating_projections():
    model = get_peft_model(tiny_model(), LoraConfig(r=2))
    adapted = sorted(name.removeprefix("base_model.model.").removesuffix(".lora_A.default")
                     for name, _ in model.named_modules() if name.endswith("lora_A.default"))
    assert adapted == ["model.layers.0.engram.kv_proj.key_proj", "model.layers.2.engram.kv_proj.key_proj"]


def test_lora_options_need_the_lora_variant():
    with pytest.raises(ValueError, match="only with lora_r"):
        gating_peft_config(lora_alpha=16)
    with pytest.raises(ValueError, match="lora_r=0 is invalid"):
        gating_peft_config(lora_r=0)
    assert gating_peft_config(lora_r=8).lora_alpha == 8


def test_engram_optimizer_on_a_gating_peft_model_holds_only_the_trainable_gating():
    from modeling_engram import create_engram_optimizer

    model = get_peft_model(tiny_model(), gating_peft_config())
    optimizer = create_engram_optimizer(model, lr=1e-3, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    held = {base_name(names[id(p)]) for group in optimizer.param_groups for p in group["params"]}
    assert held == set(GATING) and "engram_tables" not in {group["name"] for group in optimizer.param_groups}
    assert not any(module.sparse for name, module in model.named_modules() if name.endswith("engram.table"))
