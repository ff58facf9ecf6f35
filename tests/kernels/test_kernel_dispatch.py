"""The model with engram_kernel="triton" (on the CPU: Triton's interpreter) against its torch path; dispatch rules."""

import collections
import contextlib
import json
import os
import subprocess
import sys
import types

import pytest
import torch
from conftest import BACKBONES, ROOT, tiny_model
from kernel_checks import DEVICE, engram_kernels

import modeling_engram
from modeling_engram import EngramConfig, EngramForCausalLM, kernel_dispatch
from modeling_engram.kernel_dispatch import force_engram_kernel, use_triton

KERNELS = ("ngram_hash", "gather_rows", "fused_gate")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of each public kernel function, as the dispatch reaches them."""
    calls = collections.Counter()

    def spy(name, original):
        def counted(*args, **kwargs):
            mode = [f"ngram_hash compressed={kwargs.get('compressed', False)}"] if name == "ngram_hash" else []
            calls.update([name, *mode])
            return original(*args, **kwargs)
        return counted

    for name in KERNELS:
        monkeypatch.setattr(engram_kernels, name, spy(name, getattr(engram_kernels, name)))
    return calls


def batch(length=23, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 97, (2, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # left padding
    return input_ids.to(DEVICE), attention_mask.to(DEVICE)


def test_invalid_engram_kernel_is_named():
    allowed = r"engram_kernel='cuda' is invalid; it must be one of \('auto', 'triton', 'torch'\)"
    with pytest.raises(ValueError, match=allowed):
        EngramConfig(engram_kernel="cuda")


def test_dispatch_rules(monkeypatch):
    cpu, meta = torch.zeros(1), torch.zeros(1, device="meta")
    assert not use_triton("torch", cpu)
    monkeypatch.setattr(kernel_dispatch, "load_kernels", lambda: pytest.fail("auto on the CPU must not import Triton"))
    assert not use_triton("auto", cpu)
    monkeypatch.undo()
    assert use_triton("triton", cpu) == engram_kernels.INTERPRETED  # the interpreter runs Triton on the CPU
    assert not use_triton("triton", meta)  # a device Triton cannot run on: torch path
    monkeypatch.setattr(engram_kernels.utils, "INTERPRETED", False)
    assert not use_triton("triton", cpu)  # a preference, not a requirement: torch where Triton cannot run
    with force_engram_kernel("torch"):
        assert not use_triton("triton", cpu)
    with force_engram_kernel("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        use_triton("torch", cpu)  # forcing is strict
    monkeypatch.setattr(kernel_dispatch, "load_kernels", lambda: None)
    assert not use_triton("triton", cpu)
    with force_engram_kernel("triton"), pytest.raises(RuntimeError, match="does not import"):
        use_triton("auto", cpu)
    with pytest.raises(ValueError, match="engram_kernel='fast'"):
        force_engram_kernel("fast").__enter__()


def test_auto_takes_the_torch_path_on_cuda_until_a_gpu_run_has_validated_the_kernels(monkeypatch):
    # No GPU here: a stand-in for a CUDA tensor (all the dispatch reads of it) and kernels that could run on it.
    cuda = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    monkeypatch.setattr(kernel_dispatch, "load_kernels", lambda: types.SimpleNamespace(runnable_on=lambda *t: True))
    assert not use_triton("auto", cuda)  # the default: the torch path, which has run on GPUs
    assert use_triton("triton", cuda)  # the explicit opt-in still reaches the kernels
    with force_engram_kernel("auto"):
        assert not use_triton("triton", cuda)  # forcing "auto" means the default, whatever the module prefers
    assert EngramConfig().engram_kernel == "auto" and not kernel_dispatch.AUTO_USES_TRITON
    monkeypatch.setattr(kernel_dispatch, "AUTO_USES_TRITON", True)  # what a passing GPU run will switch on
    assert use_triton("auto", cuda)


@pytest.mark.parametrize(("backbone", "use_cache"), [("hc1", False), ("hc4-moe", True)],
                         ids=["hc1-no-cache", "hc4-moe-cache"])
def test_model_with_triton_kernels_gives_the_torch_logits_and_gradients(backbone, use_cache, kernel_calls):
    model = tiny_model(**BACKBONES[backbone], engram_kernel="triton").to(DEVICE)
    input_ids, attention_mask = batch()
    results = {}
    for kernel in ("torch", "config"):  # "config": the modules' own preference, engram_kernel="triton"
        model.zero_grad()
        with force_engram_kernel("torch") if kernel == "torch" else contextlib.nullcontext():
            output = model(input_ids, attention_mask=attention_mask, labels=input_ids, use_cache=use_cache)
        output.loss.backward()
        results[kernel] = output.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    # One hash launch per forward (raw ids through the token map without a cache; the cache's compressed history
    # with one); a gather and a gate per Engram layer.
    mode = f"ngram_hash compressed={use_cache}"
    assert kernel_calls == {"ngram_hash": 1, mode: 1, "gather_rows": 2, "fused_gate": 2}
    torch.testing.assert_close(results["config"][0], results["torch"][0], rtol=0, atol=1e-5)
    for name, grad in results["torch"][1].items():
        error = (results["config"][1][name] - grad).abs().max() / grad.abs().max().clamp_min(1e-30)
        assert error < 1e-3, f"{name}: relative gradient error {error:.2e}"


def test_cached_generation_with_triton_kernels_equals_the_torch_path(kernel_calls):
    model = tiny_model(hc_mult=4).to(DEVICE)
    input_ids, attention_mask = batch(length=9)
    sequences = {}
    for kernel in ("torch", "triton"):
        with force_engram_kernel(kernel):
            sequences[kernel] = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4,
                                               do_sample=False, pad_token_id=0)
    assert kernel_calls["ngram_hash"] == 4  # prefill and every decoding step hash on the kernel
    assert torch.equal(sequences["triton"], sequences["torch"])


def test_compiled_code_takes_the_torch_path_without_graph_breaks(kernel_calls):
    hasher = tiny_model(engram_kernel="triton").model.hasher.to(DEVICE)
    input_ids, attention_mask = batch()
    compiled = torch.compile(hasher, fullgraph=True, backend="eager")
    with force_engram_kernel("triton"):
        expected = hasher(input_ids, attention_mask)
        assert kernel_calls["ngram_hash"] == 1
        ours = compiled(input_ids, attention_mask)
    assert kernel_calls["ngram_hash"] == 1
    assert all(torch.equal(ours[k], expected[k]) for k in expected)


def test_state_dict_is_the_same_whatever_the_kernel():
    states = [tiny_model(engram_kernel=kernel).state_dict() for kernel in ("auto", "triton", "torch")]
    for state in states[1:]:
        assert list(state) == list(states[0])
        assert all(torch.equal(state[k], states[0][k]) for k in state)


def test_a_model_loaded_preferring_triton_runs_where_triton_cannot(tmp_path, monkeypatch, kernel_calls):
    model = tiny_model(engram_kernel="triton")
    input_ids, attention_mask = batch()
    with torch.no_grad(), force_engram_kernel("torch"):
        expected = model(input_ids.cpu(), attention_mask=attention_mask.cpu()).logits
    model.save_pretrained(tmp_path)
    monkeypatch.setattr(engram_kernels.utils, "INTERPRETED", False)  # a CPU machine without the interpreter
    assert EngramForCausalLM.from_pretrained(tmp_path).config.engram_kernel == "auto"  # a load-time option, not saved
    loaded = EngramForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", engram_kernel="triton").eval()
    assert loaded.config.engram_kernel == "triton"
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids.cpu(), attention_mask=attention_mask.cpu()).logits, expected)
    assert not kernel_calls
    assert EngramForCausalLM.from_pretrained(tmp_path, engram_kernel="torch").model.hasher.kernel == "torch"
    with pytest.raises(ValueError, match="engram_kernel='bogus'"):
        EngramForCausalLM.from_pretrained(tmp_path, engram_kernel="bogus")


REMOTE_CODE_RUN = r"""
import importlib, json, sys
import torch

sys.modules["modeling_engram"] = None  # the exported folder must stand alone
sys.modules["engram_kernels"] = None  # and run without the kernels
from transformers import AutoModelForCausalLM

folder, root, input_ids, attention_mask = sys.argv[1], sys.argv[2], *(torch.tensor(json.loads(a)) for a in sys.argv[3:])
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager").eval()
dispatch = importlib.import_module(type(model).__module__.rsplit(".", 1)[0] + ".kernel_dispatch")
result = {"module": type(model).__module__, "kernels_without": dispatch.load_kernels() is not None}
with torch.no_grad():
    result["torch"] = model(input_ids, attention_mask=attention_mask).logits.tolist()
    try:
        with dispatch.force_engram_kernel("triton"):
            model(input_ids, attention_mask=attention_mask)
    except RuntimeError as error:
        result["forced_without"] = str(error)

    del sys.modules["engram_kernels"]  # now the kernels are installed: this checkout's kernels/engram_kernels
    sys.path.insert(0, f"{root}/kernels")
    import engram_kernels as kernels
    dispatch.load_kernels.cache_clear()
    launched = []
    for name in ("ngram_hash", "gather_rows", "fused_gate"):
        setattr(kernels, name, lambda *a, _f=getattr(kernels, name), _n=name, **k: launched.append(_n) or _f(*a, **k))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU: the interpreter (TRITON_INTERPRET=1)
    with dispatch.force_engram_kernel("triton"):
        logits = model.to(device)(input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    result["triton"] = logits.tolist()
    result["launched"] = sorted(set(launched))
print(json.dumps(result))
"""


@pytest.mark.slow
def test_trust_remote_code_export_runs_without_the_kernels_and_uses_them_when_importable(tmp_path):
    model = tiny_model(hc_mult=4)
    model.config.register_for_auto_class()
    model.register_for_auto_class("AutoModelForCausalLM")
    model.save_pretrained(tmp_path / "export")
    assert (tmp_path / "export" / "kernel_dispatch.py").exists()
    input_ids, attention_mask = (t.cpu() for t in batch())
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    run = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_RUN, str(tmp_path / "export"), ROOT,
         json.dumps(input_ids.tolist()), json.dumps(attention_mask.tolist())],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["module"].startswith("transformers_modules.") and not result["kernels_without"]
    assert "does not import" in result["forced_without"]
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(torch.tensor(result["torch"]), expected)
    atol = 1e-4 if DEVICE.type == "cuda" else 1e-5  # a GPU's fp32 matmuls round differently from the CPU's
    torch.testing.assert_close(torch.tensor(result["triton"]), expected, rtol=0, atol=atol)
    assert result["launched"] == sorted(["ngram_hash", "gather_rows", "fused_gate"])
    assert modeling_engram.__name__ == "modeling_engram"


def test_gate_heatmap_still_sees_the_gate_when_the_kernels_run(kernel_calls):
    from modeling_engram.visualize import gate_values

    model = tiny_model(hc_mult=4, engram_kernel="triton").to(DEVICE)
    input_ids, _ = batch()
    with force_engram_kernel("torch"):
        expected = gate_values(model, input_ids)
    watched = gate_values(model, input_ids)  # hooks on the gate module: the layer takes the torch path for it
    assert list(watched) == model.config.engram_layer_ids and kernel_calls["fused_gate"] == 0
    assert all(torch.equal(watched[k], expected[k]) for k in expected)
    with torch.no_grad():
        model(input_ids)
    assert kernel_calls["fused_gate"] == len(model.config.engram_layer_ids)  # unwatched: the fused kernel
