"""Engram on a multi-branch stream: one table and value per layer, one key per branch; PEFT on keys."""

import pytest
import torch
from conftest import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from modeling_engram.engram_layer import causal_depthwise_conv

MATMULS = {"mm", "addmm", "bmm", "matmul", "linear", "baddbmm"}


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        if func.overloadpacket.__name__ in MATMULS:
            self.shapes.append(tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


def test_one_table_one_value_and_one_key_per_branch():
    model = tiny_model(hc_mult=4)
    engram = model.model.layers[0].engram
    assert engram.table.weight.shape == (sum(model.config.engram_table_sizes[0]), 8)
    assert engram.kv_proj.value_proj.weight.shape == (32, 32)  # [hidden, d_mem], shared by the 4 branches
    assert engram.kv_proj.key_proj.weight.shape == (4 * 32, 32)  # W_K^(1..4) stacked
    assert engram.query_norm.weight.shape == engram.key_norm.weight.shape == (4, 32)


@torch.no_grad()
def test_value_and_keys_are_two_matmuls_without_copying_the_weights():
    """One matmul per projection and no concatenation of their weights (in a decode step that copy costs as much
    as the matmul it feeds)."""
    model = tiny_model(hc_mult=4)
    engram = model.model.layers[0].engram
    hidden = torch.randn(2, 7, 4 * 32)
    hash_ids = model.model.hasher(torch.randint(3, 97, (2, 7)))[0]
    with CountMatmuls() as counter:
        engram(hidden, hash_ids)
    assert counter.shapes == [((2 * 7, 32), (32, 32)), ((2 * 7, 32), (32, 4 * 32))]  # rows @ W_V^T, rows @ W_K^T
    assert "cat" not in counter.ops


@torch.no_grad()
def test_key_value_projection_equals_its_weights():
    kv_proj = tiny_model(hc_mult=4).model.layers[0].engram.kv_proj
    rows = torch.randn(3, 5, 32)
    value, keys = kv_proj(rows)
    torch.testing.assert_close(value, rows @ kv_proj.value_proj.weight.T)
    torch.testing.assert_close(keys, rows @ kv_proj.key_proj.weight.T)


def test_peft_trains_only_the_gating_parameters():
    """LoRA on the branch keys (`target_parameters`) plus the query/key norms; table and value stay frozen."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model(hc_mult=4)
    batch = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(batch).logits
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".engram." in n}
    config = LoraConfig(r=4, target_modules=[], target_parameters=["kv_proj.key_proj.weight"],
                        modules_to_save=["query_norm", "key_norm"])
    peft_model = get_peft_model(model, config)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_" in n and ".kv_proj." in n) or "_norm.modules_to_save" in n for n in trainable)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    peft_model.train()
    for _ in range(3):
        peft_model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    with torch.no_grad():
        assert (peft_model(batch).logits - before).abs().max() > 1e-4
    for name, parameter in peft_model.named_parameters():
        original = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if original in frozen:
            assert torch.equal(parameter, frozen[original]), name


def conv1d_reference(inputs: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
    """The causal depthwise conv as the layer computed it before: F.conv1d on zero-padded [B, C, T] inputs."""
    from torch.nn import functional as F

    state_len = (weight.shape[-1] - 1) * dilation
    padded = F.pad(inputs.transpose(1, 2), (state_len, 0))
    return F.conv1d(padded, weight, dilation=dilation, groups=weight.shape[0]).transpose(1, 2)


# dtype: (atol, rtol) against the fp32 F.conv1d reference; the taps accumulate in fp32, so bf16 differs only by
# the rounding of its inputs and of the result.
CONV_TOLERANCES = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-2, 1e-2)}


@pytest.mark.parametrize("dtype", list(CONV_TOLERANCES), ids=["fp32", "bf16"])
@pytest.mark.parametrize("length", [1, 7, 63, 500])
@pytest.mark.parametrize("kernel,dilation", [(4, 3), (4, 2), (2, 5), (1, 3)], ids=["k4d3", "k4d2", "k2d5", "k1d3"])
def test_shifted_multiply_adds_equal_the_depthwise_conv(dtype, length, kernel, dilation):
    generator = torch.Generator().manual_seed(length)
    inputs = torch.randn(2, length, 12, generator=generator).to(dtype).requires_grad_()
    weight = torch.randn(12, 1, kernel, generator=generator, requires_grad=True)
    ours = causal_depthwise_conv(inputs, weight[:, 0].t(), length, dilation)
    reference = conv1d_reference(inputs.float(), weight, dilation)
    atol, rtol = CONV_TOLERANCES[dtype]
    torch.testing.assert_close(ours, reference, atol=atol, rtol=rtol)
    grad = torch.randn_like(reference)
    ours_grads = torch.autograd.grad(ours, (inputs, weight), grad)
    reference_grads = torch.autograd.grad(reference, (inputs, weight), grad)
    for got, want in zip(ours_grads, reference_grads):
        torch.testing.assert_close(got.float(), want.float(), atol=atol * 10, rtol=rtol)


@pytest.mark.parametrize("context", [0, 1, 5, 9])
def test_shifted_multiply_adds_continue_from_left_context(context):
    """`inputs` may start with up to (K-1)*dilation positions of context (the cache state): the result is the last
    positions of the conv over the whole sequence."""
    generator = torch.Generator().manual_seed(context)
    whole = torch.randn(2, context + 6, 8, generator=generator)
    weight = torch.randn(8, 1, 4, generator=generator)
    ours = causal_depthwise_conv(whole, weight[:, 0].t(), 6, 3)
    torch.testing.assert_close(ours, conv1d_reference(whole, weight, 3)[:, context:], atol=1e-6, rtol=1e-5)


def reference_engram(layer, hidden_states: torch.Tensor, rows: torch.Tensor, token_mask=None) -> torch.Tensor:
    """The Engram layer as it computed before the factored formulation: both norms materialised, the gate, U, the
    conv norm of U and F.conv1d, module by module (the paper's equations as written)."""
    from torch.nn import functional as F

    from modeling_engram.engram_layer import signed_sqrt_gate

    branches = (layer.hc_mult, layer.hidden_size)
    weight = torch.cat([layer.kv_proj.value_proj.weight, layer.kv_proj.key_proj.weight])
    value, keys = F.linear(rows, weight).split([layer.hidden_size, layer.hc_mult * layer.hidden_size], dim=-1)
    alpha = signed_sqrt_gate(layer.query_norm(hidden_states.unflatten(-1, branches)),
                             layer.key_norm(keys.unflatten(-1, branches)))
    values = alpha * value.unsqueeze(-2)
    conv_inputs = layer.conv_norm(values).flatten(-2)
    if token_mask is not None:
        conv_inputs = conv_inputs * token_mask.unsqueeze(-1).to(conv_inputs.dtype)
    conv = F.silu(conv1d_reference(conv_inputs, layer.short_conv.weight, layer.short_conv.dilation))
    return values.flatten(-2) + conv


def engram_inputs(hc_mult: int, dtype=torch.float32, seed: int = 0):
    model = tiny_model(hc_mult=hc_mult).to(dtype)
    layer = model.model.layers[0].engram
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # norm weights away from 1, so a misplaced weight shows
        for norm in (layer.query_norm, layer.key_norm, layer.conv_norm):
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) + 0.5)
    hidden = torch.randn(2, 9, hc_mult * 32, generator=generator).to(dtype)
    hash_ids = model.model.hasher(torch.randint(3, 97, (2, 9), generator=generator))[0]
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    return layer, hidden, hash_ids, mask


# dtype: (atol, rtol) of the factored layer against the module-by-module formulation (float reassociation only)
LAYER_TOLERANCES = {torch.float32: (2e-6, 1e-5), torch.bfloat16: (3e-2, 2e-2)}


@pytest.mark.parametrize("dtype", list(LAYER_TOLERANCES), ids=["fp32", "bf16"])
@pytest.mark.parametrize("hc_mult", [1, 4])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "left-padded"])
def test_factored_layer_equals_the_module_by_module_formulation(hc_mult, dtype, masked):
    layer, hidden, hash_ids, mask = engram_inputs(hc_mult, dtype)
    mask = mask if masked else None
    hidden.requires_grad_()
    rows = layer.table(hash_ids).detach().requires_grad_()
    ours = layer(hidden, hash_ids, token_mask=mask, rows=rows)
    reference = reference_engram(layer, hidden, rows, mask)
    atol, rtol = LAYER_TOLERANCES[dtype]
    torch.testing.assert_close(ours, reference, atol=atol, rtol=rtol)
    parameters = [p for p in layer.parameters() if p.requires_grad and p is not layer.table.weight]
    grad = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, [hidden, rows, *parameters], grad)
    reference_grads = torch.autograd.grad(reference, [hidden, rows, *parameters], grad)
    for got, want in zip(ours_grads, reference_grads):
        scale = want.abs().max().clamp_min(1)  # gradient sums grow with the batch: compare relative to their size
        torch.testing.assert_close(got / scale, want / scale, atol=atol * 10, rtol=rtol * 10)


@pytest.mark.parametrize("hc_mult", [1, 4])
def test_inference_path_reuses_memory_without_changing_a_bit(hc_mult):
    """Without autograd the layer computes products and conv inputs in the keys' memory: same bits as with
    autograd, and the caller's tensors are left as they were."""
    layer, hidden, hash_ids, mask = engram_inputs(hc_mult)
    rows = layer.table(hash_ids).detach()
    hidden_before, rows_before = hidden.clone(), rows.clone()
    with torch.no_grad():
        inference = layer(hidden, hash_ids, token_mask=mask, rows=rows)
    assert torch.equal(inference, layer(hidden, hash_ids, token_mask=mask, rows=rows).detach())
    assert torch.equal(hidden, hidden_before) and torch.equal(rows, rows_before)


@torch.no_grad()
def test_watched_modules_take_the_module_by_module_path():
    """A forward hook on the gate (gate_heatmap), the conv or a norm sees its own module run; the result agrees."""
    layer, hidden, hash_ids, mask = engram_inputs(4)
    factored = layer(hidden, hash_ids, token_mask=mask)
    for module in (layer.gate, layer.short_conv, layer.conv_norm, layer.query_norm):
        seen = []
        handle = module.register_forward_hook(lambda m, args, out: seen.append(out))
        try:
            watched = layer(hidden, hash_ids, token_mask=mask)
        finally:
            handle.remove()
        assert len(seen) == 1, type(module).__name__
        torch.testing.assert_close(watched, factored, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("hc_mult", [1, 4])
@torch.no_grad()
def test_bf16_factored_layer_is_as_close_to_fp32_as_the_module_by_module_one(hc_mult):
    """In bf16 the factored layer rounds less often (fp32 norms, gate and conv accumulation): its distance to the
    fp32 result is no larger than the module-by-module formulation's."""
    layer, hidden, hash_ids, mask = engram_inputs(hc_mult, torch.bfloat16)
    rows = layer.table(hash_ids)
    ours = layer(hidden, hash_ids, token_mask=mask, rows=rows).float()
    module_by_module = reference_engram(layer, hidden, rows, mask).float()
    layer.float()
    exact = reference_engram(layer, hidden.float(), rows.float(), mask)
    assert (ours - exact).abs().max() <= (module_by_module - exact).abs().max()


def test_without_a_short_conv_the_layer_adds_gate_times_value_and_keeps_no_conv_state(tmp_path):
    """engram_kernel_size=0 (DeepSeek-V4.1): no conv parameters or norm, no conv slot in the cache, Y = U."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from modeling_engram import model_card
    from modeling_engram.engram_layer import TOKEN_STATE, signed_sqrt_gate

    model = tiny_model(hc_mult=4, engram_kernel_size=0)
    layer = model.model.layers[0].engram
    assert layer.short_conv is None and layer.conv_norm is None
    assert not [name for name in model.state_dict() if "conv" in name]
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 4 * 32, generator=generator, requires_grad=True)
    hash_ids = model.model.hasher(torch.randint(3, 97, (2, 9), generator=generator))[0]
    rows = layer.table(hash_ids).detach()
    value, keys = layer.kv_proj(rows)
    alpha = signed_sqrt_gate(layer.query_norm(hidden.unflatten(-1, (4, 32))), layer.key_norm(keys.unflatten(-1, (4, 32))))
    expected = (alpha * value.unsqueeze(-2)).flatten(-2)
    torch.testing.assert_close(layer(hidden, hash_ids, rows=rows), expected, atol=2e-6, rtol=1e-5)  # factored
    handle = layer.gate.register_forward_hook(lambda *args: None)  # module by module
    try:
        assert torch.equal(layer(hidden, hash_ids, rows=rows), expected)
    finally:
        handle.remove()

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(3, 97, (2, 6)), cache=cache, use_cache=True)
    for layer_id in model.config.engram_layer_ids:
        states = cache.layers[layer_id].conv_states
        assert len(states) == 1 and states[TOKEN_STATE].shape == (2, 1, 2)  # the last 2 compressed ids only
    assert "| short conv | none (the layer adds gate * value) |" in model_card(model).text
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(3, 97, (2, 7), generator=generator)
    with torch.no_grad():
        assert reloaded.model.layers[0].engram.short_conv is None and reloaded.config.engram_kernel_size == 0
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="engram_kernel_size=-1 is invalid; it must be >= 1, or 0 for no short conv"):
        tiny_model(engram_kernel_size=-1)
