"""The fused Triton gate, forward and backward, against the fp32 torch reference and the model's torch path."""

import copy

import pytest
import torch
from conftest import tiny_config
from kernel_checks import DEVICE, LENGTHS, assert_close, engram_kernels, mutant

from modeling_engram.engram_layer import EngramLayer
from modeling_engram.kernel_dispatch import force_engram_kernel

gate = engram_kernels.gate
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NAMES = ("query", "key", "value", "query_weight", "key_weight")


def gate_case(length: int, branches: int, dtype: torch.dtype, dim: int = 48, seed: int = 0):
    """Inputs [B, T, M, D] (one sequence at T=500: interpreter time), norm weights near 1, an output gradient."""
    generator = torch.Generator().manual_seed(seed)
    batch = 1 if length >= 500 else 2
    query = torch.randn(batch, length, branches, dim, generator=generator)
    query[0, 0] = 0  # a zero query: score 0, alpha 0.5, no gradient through the clamp
    key = torch.randn(batch, length, branches, dim, generator=generator)
    value = torch.randn(batch, length, dim, generator=generator)
    weights = [1 + 0.2 * torch.randn(branches, dim, generator=generator) for _ in range(2)]
    grad = torch.randn(batch, length, branches, dim, generator=generator)
    return [t.to(device=DEVICE, dtype=dtype) for t in (query, key, value, *weights, grad)]


def check_gate(module, case, dtype, eps=1e-6):
    *inputs, grad = case
    inputs = [t.clone().requires_grad_() for t in inputs]
    out = module.fused_gate(*inputs, eps=eps)
    expected = gate.fused_gate_reference(*inputs, eps=eps)
    assert out.dtype == expected.dtype
    assert_close(out, expected, dtype, "gate output")
    grads = torch.autograd.grad(out, inputs, grad)
    expected_grads = torch.autograd.grad(expected, inputs, grad)
    for name, got, want in zip(NAMES, grads, expected_grads):
        assert got.dtype == want.dtype
        assert_close(got, want, dtype, f"gradient of {name}")


@pytest.mark.parametrize("branches", [1, 4], ids=lambda m: f"hc{m}")
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("length", LENGTHS, ids=lambda n: f"T{n}")
def test_gate_forward_and_gradients_match_the_reference(length, dtype, branches):
    check_gate(gate.kernel, gate_case(length, branches, dtype, seed=length), dtype)


def test_inputs_at_the_scale_of_eps():
    # mean(x^2) ~ eps: the RMSNorm epsilon changes the result at first order here (on unit-scale inputs it is 1e-6).
    query, key, *rest = gate_case(63, 4, torch.float32, seed=3)
    check_gate(gate.kernel, [query * 1e-3, key * 1e-3, *rest], torch.float32)


@pytest.mark.parametrize("dim", [1, 130], ids=lambda d: f"D{d}")
def test_odd_widths(dim):
    check_gate(gate.kernel, gate_case(7, 3, torch.float32, dim=dim), torch.float32)


def test_keys_may_be_a_view_into_one_fused_key_value_projection():
    # A fused projection [B, T, (M + 1) * D] split into keys [B, T, M, D] and the value [B, T, D], without copies.
    query, key, value, query_weight, key_weight, grad = gate_case(7, 4, torch.float32)
    fused = torch.cat([key.flatten(-2), value], dim=-1).requires_grad_()
    key_view, value_view = fused[..., : 4 * 48].unflatten(-1, (4, 48)), fused[..., 4 * 48 :]
    assert not key_view.is_contiguous()
    out = gate.fused_gate(query, key_view, value_view, query_weight, key_weight)
    (grad_fused,) = torch.autograd.grad(out, fused, grad)
    fused_ref = fused.detach().clone().requires_grad_()
    expected = gate.fused_gate_reference(
        query, fused_ref[..., : 4 * 48].unflatten(-1, (4, 48)), fused_ref[..., 4 * 48 :], query_weight, key_weight
    )
    (grad_ref,) = torch.autograd.grad(expected, fused_ref, grad)
    assert_close(out, expected, torch.float32, "gate output")
    assert_close(grad_fused, grad_ref, torch.float32, "gradient of the fused projection")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_engram_layer_gate_dispatches_to_the_kernel(dtype):
    # Reference: the layer's torch path in fp32 on the same (dtype-rounded) inputs and weights. In bf16 the torch
    # path itself rounds the scores to bf16 (norm-weight gradients then lose ~40%); the kernel works in fp32.
    torch.manual_seed(0)
    layer = EngramLayer(tiny_config(hc_mult=4, rms_norm_eps=1e-5), layer_idx=0)
    with torch.no_grad():
        for norm in (layer.query_norm, layer.key_norm):
            norm.weight.normal_(1, 0.2)
    layers = {"triton": copy.deepcopy(layer).to(device=DEVICE, dtype=dtype)}
    layers["torch"] = copy.deepcopy(layers["triton"]).float()
    inputs = gate_case(63, 4, dtype, dim=32)[:3]
    outputs = {}
    for kernel, module in layers.items():
        with force_engram_kernel(kernel):
            out = module.gated_values(*(t.to(module.key_norm.weight.dtype) for t in inputs))
        out.float().square().sum().backward()
        outputs[kernel] = [out.detach(), module.query_norm.weight.grad, module.key_norm.weight.grad]
        assert out.dtype == module.key_norm.weight.dtype
    for got, want, what in zip(outputs["triton"], outputs["torch"], ("values", "query norm grad", "key norm grad")):
        assert_close(got, want, dtype, what)


def test_bad_shapes_are_named():
    query, key, value, query_weight, key_weight, _ = gate_case(7, 2, torch.float32)
    with pytest.raises(ValueError, match="value"):
        gate.fused_gate(query, key, value[..., :-1], query_weight, key_weight)
    with pytest.raises(ValueError, match="norm weights"):
        gate.fused_gate(query, key, value, query_weight[:1], key_weight)


MUTATIONS = {
    "forward-without-1/sqrt(d)": (
        "1.0 / math.sqrt(dim),\n        BLOCK_T=block_t, D_PAD=d_pad, num_warps=warps,\n    )\n    return out",
        "1.0,\n        BLOCK_T=block_t, D_PAD=d_pad, num_warps=warps,\n    )\n    return out",
    ),
    "backward-drops-the-rms-projection": (
        "dq = q_rstd[:, None] * (d_qhat - q_hat * (tl.sum(d_qhat * q_hat, axis=1) / D)[:, None])",
        "dq = q_rstd[:, None] * d_qhat",
    ),
    "backward-wrong-sqrt-derivative": ("* 0.5 / root", "* 0.5 * root"),
    "key-norm-eps-tenfold": ("k_rstd = tl.rsqrt(tl.sum(k * k, axis=1) / D + eps)",
                             "k_rstd = tl.rsqrt(tl.sum(k * k, axis=1) / D + 10 * eps)"),
    "backward-dv-keeps-the-last-branch": ("dv += grad * alpha[:, None]", "dv = grad * alpha[:, None]"),
    "backward-overwrites-the-weight-partials": (
        "dwq = tl.load(dwq_ptr + partial, mask=d < D) + tl.sum(d_qn * q_hat, axis=0)",
        "dwq = tl.sum(d_qn * q_hat, axis=0)",
    ),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_deliberately_wrong_gate_kernel_fails_the_parity_check(mutation):
    wrong = mutant(gate.kernel, *MUTATIONS[mutation])
    case = gate_case(63, 4, torch.float32, seed=1)
    if mutation == "key-norm-eps-tenfold":  # eps only matters where mean(x^2) is near it
        case = [case[0] * 1e-3, case[1] * 1e-3, *case[2:]]
    check_gate(gate.kernel, case, torch.float32)
    with pytest.raises(AssertionError, match="error"):
        check_gate(wrong, case, torch.float32)
