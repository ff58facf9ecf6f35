"""Gating-only fine-tuning: exactly the gating parameters train (LoRA through PEFT, or in full); adapters save,
load and merge."""

import re

import pytest
import torch
from conftest import tiny_model
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from modeling_engram import create_engram_optimizer, gating_parameter_names, gating_peft_config, train_only_gating

GATING = [f"model.layers.{i}.engram.{name}" for i in (0, 2)
          for name in ("kv_proj.key_weight", "query_norm.weight", "key_norm.weight")]


def ids(batch=2, length=11, seed=0):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def base_name(name: str) -> str:
    """The base-model parameter a PEFT parameter adapts: LoRA factors adapt the keys, saved copies their module."""
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    name = re.sub(r"\.modules_to_save\.default", "", name)
    return re.sub(r"\.kv_proj\.lora_[AB]\.default\.weight$", ".kv_proj.key_weight", name)


def train_steps(model, parameters, steps=3):
    optimizer = torch.optim.AdamW(parameters, lr=1e-2, weight_decay=0.0)
    model.train()
    for step in range(steps):
        batch = ids(seed=step)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def assert_only_gating_changed(state: dict, original: dict):
    assert state.keys() == original.keys()
    for name, tensor in original.items():
        if name in GATING:
            assert not torch.equal(state[name], tensor), f"{name} did not train"
        else:
            assert torch.equal(state[name], tensor), f"{name} changed"


@pytest.mark.parametrize("backbone", ["hc1", "hc4-moe"])
def test_gating_parameters_are_the_branch_keys_and_the_query_key_norms(backbone):
    from conftest import BACKBONES

    model = tiny_model(**BACKBONES[backbone])
    assert sorted(gating_parameter_names(model)) == sorted(GATING)
    hc = model.config.hc_mult
    assert model.get_parameter(GATING[0]).shape == (hc * 32, 32)  # every branch's key, one matrix
    assert model.get_parameter(GATING[1]).shape == (hc, 32)


def test_gating_lora_trains_only_the_gating_and_saves_loads_and_merges(tmp_path, capsys):
    tiny_model(hc_mult=4).save_pretrained(tmp_path / "base")
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), gating_peft_config(lora_r=4))

    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert {base_name(name) for name in trainable} == set(GATING)
    lora = 2 * 4 * (32 + 4 * 32)  # per Engram layer: A [4, 32] and B [128, 4] on the keys [128, 32]
    norms = sum(original[name].numel() for name in GATING if "norm" in name)
    assert sum(p.numel() for p in trainable.values()) == lora + norms == 1792
    model.print_trainable_parameters()
    assert "trainable params: 1,792 ||" in capsys.readouterr().out

    train_steps(model, trainable.values())
    batch = ids(seed=9)
    with torch.no_grad():
        adapted = model(input_ids=batch).logits
        model.save_pretrained(tmp_path / "adapter")
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
        assert torch.equal(reloaded.eval()(input_ids=batch).logits, adapted)
        auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
        assert torch.equal(auto.eval()(input_ids=batch).logits, adapted)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=batch).logits, adapted, atol=1e-5, rtol=1e-5)
    assert_only_gating_changed(merged.state_dict(), original)


@pytest.mark.parametrize("backbone", ["hc4", "hc4-moe"])
def test_train_only_gating_trains_the_gating_in_full_and_nothing_else(backbone):
    from conftest import BACKBONES

    model = tiny_model(**BACKBONES[backbone])
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert train_only_gating(model) == sorted(GATING)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(GATING)
    optimizer = create_engram_optimizer(model, lr=1e-2, weight_decay=0.1)  # tables frozen: no table group
    assert [group["name"] for group in optimizer.param_groups] == ["decay", "no_decay"]
    model.train()
    for step in range(3):
        batch = ids(seed=step)
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = model.state_dict()
    if "moe" in backbone:  # the balancing biases are buffers updated after each step, not gating parameters
        assert any(not torch.equal(state[n], original[n]) for n in original if "e_score_correction_bias" in n)
        original = {n: t for n, t in original.items() if "e_score_correction_bias" not in n and "expert_load" not in n}
        state = {n: state[n] for n in original}
    assert_only_gating_changed(state, original)


def test_engram_optimizer_on_a_gating_peft_model_holds_only_the_trainable_gating():
    model = get_peft_model(tiny_model(), gating_peft_config())
    optimizer = create_engram_optimizer(model, lr=1e-3, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    held = {base_name(names[id(p)]) for group in optimizer.param_groups for p in group["params"]}
    assert held == set(GATING) and "engram_tables" not in {group["name"] for group in optimizer.param_groups}
    assert not any(module.sparse for name, module in model.named_modules() if name.endswith("engram.table"))


def test_bad_gating_arguments_are_named():
    with pytest.raises(ValueError, match="lora_r=0 is invalid"):
        gating_peft_config(lora_r=0)
    assert gating_peft_config(lora_r=16).lora_alpha == 16
    with pytest.raises(ValueError, match="no Engram layer"):
        train_only_gating(tiny_model(engram_layer_ids=[]))
