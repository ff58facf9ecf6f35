"""mHC residual: Sinkhorn constraints, the hc_mult = 1 identity with Llama, branch mixing, gradients."""

import math

import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_engram import EngramForCausalLM
from modeling_engram.mhc import HyperConnection, HyperHead, PlainResidual, sinkhorn_knopp


def ids(batch=2, length=11, seed=0):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def copy_backbone(source: EngramForCausalLM, target: EngramForCausalLM) -> None:
    """Copy every weight but Engram's and the hyper-connections' from `source` into `target`."""
    weights = {k: v for k, v in source.state_dict().items() if ".engram." not in k}
    missing, unexpected = target.load_state_dict(weights, strict=False)
    assert not unexpected
    assert all("_hc." in name or "hc_head" in name or ".engram." in name for name in missing)


def silence_engram(model: EngramForCausalLM) -> None:
    """Zero every Engram value projection: Engram then adds exactly 0 to the residual stream."""
    with torch.no_grad():
        for layer_id in model.config.engram_layer_ids:
            model.model.layers[layer_id].engram.kv_proj.value_proj.weight.zero_()


def test_sinkhorn_rows_and_columns_sum_to_one():
    logits = torch.randn(5000, 4, 4, generator=torch.Generator().manual_seed(0))
    matrix = sinkhorn_knopp(logits, iterations=20)
    assert (matrix >= 0).all()
    torch.testing.assert_close(matrix.sum(-1), torch.ones(5000, 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(matrix.sum(-2), torch.ones(5000, 4), atol=1e-3, rtol=0)


def test_sinkhorn_column_defect_shrinks_with_iterations():
    logits = 2 * torch.randn(1000, 4, 4, generator=torch.Generator().manual_seed(1))
    defects = [(sinkhorn_knopp(logits, n).sum(-2) - 1).abs().max().item() for n in (1, 5, 20, 100, 300)]
    assert defects == sorted(defects, reverse=True) and defects[0] > 0.5 and defects[-1] < 1e-6


def test_sinkhorn_keeps_a_doubly_stochastic_matrix():
    target = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.7, 0.2], [0.2, 0.1, 0.7]])
    torch.testing.assert_close(sinkhorn_knopp(target.log(), 20), target, atol=1e-6, rtol=0)


def test_hyper_connection_residual_matrix_is_doubly_stochastic_for_any_input():
    config = tiny_config(hc_mult=4, hc_sinkhorn_iters=20)
    connection = HyperConnection(config)
    with torch.no_grad():  # far from the initial values: dynamic part on, random static part
        connection.proj.normal_(0, 0.05)
        connection.scale.fill_(1.0)
        connection.bias.normal_(0, 1.0)
    streams = 3 * torch.randn(2, 50, 4 * 32, generator=torch.Generator().manual_seed(0))
    pre, post, res = connection.mixing(streams)
    assert pre.shape == (2, 50, 4) and post.shape == (2, 50, 4) and res.shape == (2, 50, 4, 4)
    assert ((pre > 0) & (pre < 1)).all() and ((post > 0) & (post < 2)).all() and (res >= 0).all()
    torch.testing.assert_close(res.sum(-1), torch.ones(2, 50, 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(res.sum(-2), torch.ones(2, 50, 4), atol=1e-3, rtol=0)
    assert res.std(dim=(0, 1)).max() > 1e-3  # input-dependent


def test_initial_mixing_is_mean_in_full_out_and_mostly_own_branch():
    connection = tiny_model(hc_mult=4).model.layers[0].attn_hc
    pre, post, res = connection.mixing(torch.randn(1, 5, 4 * 32))
    torch.testing.assert_close(pre, torch.full_like(pre, 0.25), atol=5e-3, rtol=0)
    torch.testing.assert_close(post, torch.ones_like(post), atol=5e-3, rtol=0)
    expected = torch.full((4, 4), 0.1 / 3).fill_diagonal_(0.9)
    torch.testing.assert_close(res, expected.expand_as(res), atol=5e-3, rtol=0)


def test_hc_mult_1_has_no_hyper_connection_parameters():
    model = tiny_model(hc_mult=1)
    assert model.model.hc_head is None
    assert all(isinstance(layer.attn_hc, PlainResidual) and isinstance(layer.mlp_hc, PlainResidual)
               for layer in model.model.layers)
    assert not any("_hc" in name or "hc_head" in name for name, _ in model.named_parameters())


@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hc_mult_1_is_exactly_the_llama_residual(attn):
    """The identity case: with hc_mult = 1 and Engram silenced, the model is Llama, bit for bit."""
    model = tiny_model(hc_mult=1, attn_implementation=attn)
    silence_engram(model)
    config = model.config
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, pad_token_id=config.pad_token_id, attn_implementation=attn,
    )).eval()
    missing, unexpected = llama.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    assert all(".engram." in name or name.startswith("model.hasher.") for name in unexpected)
    batch = ids()
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    assert torch.equal(model(batch).logits, llama(batch).logits)
    real = mask.bool()
    assert torch.equal(model(batch, attention_mask=mask).logits[real], llama(batch, attention_mask=mask).logits[real])


@torch.no_grad()
def test_equal_branches_with_static_mixing_carry_the_plain_residual_stream():
    """hc_mult = 4 with the input-dependent part off: pre sums to 1, post = 1 and res is doubly stochastic (here
    random), so four equal branches stay four copies of the plain residual stream."""
    plain = tiny_model(hc_mult=1)
    branched = tiny_model(hc_mult=4)
    copy_backbone(plain, branched)
    silence_engram(plain)
    silence_engram(branched)
    for module in branched.modules():
        if isinstance(module, (HyperConnection, HyperHead)):
            module.scale.zero_()
        if isinstance(module, HyperConnection):
            module.bias[8:].normal_(0, 2.0)  # b_res: any doubly stochastic residual mixing
    batch = ids()
    torch.testing.assert_close(branched(batch).logits, plain(batch).logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_hyper_connection_with_dynamic_mixing_changes_the_output():
    """Guard for the test above: the same comparison fails once the input-dependent mixing is on."""
    plain, branched = tiny_model(hc_mult=1), tiny_model(hc_mult=4)
    copy_backbone(plain, branched)
    silence_engram(plain)
    silence_engram(branched)
    for module in branched.modules():
        if isinstance(module, HyperConnection):
            module.scale.fill_(1.0)
            module.proj.normal_(0, 0.3)
    batch = ids()
    assert (branched(batch).logits - plain(batch).logits).abs().max() > 1e-2


def test_branches_differ_through_per_branch_engram_gates():
    model = tiny_model(hc_mult=4)
    branches = model.model(ids(), output_hidden_states=True).hidden_states[1]  # after layer 0 (Engram), [B, T, 4, D]
    assert (branches[..., 0, :] - branches[..., 1, :]).abs().max() > 1e-4


@pytest.mark.parametrize("hc_mult", [1, 4])
def test_hidden_states_follow_transformers_deepseek_v4_convention(hc_mult):
    """Each layer's input is [B, T, hc_mult, hidden] with mHC (as transformers' in-tree DeepSeek-V4 records it), or
    [B, T, hidden] without; the last entry is the normed output, [B, T, hidden]."""
    model = tiny_model(hc_mult=hc_mult)
    batch = ids()
    out = model.model(batch, output_hidden_states=True)
    streams = (*batch.shape, hc_mult, 32) if hc_mult > 1 else (*batch.shape, 32)
    assert [tuple(h.shape) for h in out.hidden_states] == [streams] * 3 + [(*batch.shape, 32)]
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    embeds = model.model.embed_tokens(batch)
    assert torch.equal(out.hidden_states[0], embeds.unsqueeze(2).expand(streams) if hc_mult > 1 else embeds)


def test_every_hyper_connection_parameter_gets_a_gradient():
    model = tiny_model(hc_mult=4).train()
    batch = ids()
    model(batch, labels=batch).loss.backward()
    names = [n for n, _ in model.named_parameters() if "_hc." in n or "hc_head" in n]
    assert len(names) == 3 * 2 * 3 + 3
    for name, parameter in model.named_parameters():
        if name in names:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_sinkhorn_iterations_come_from_the_config():
    model = EngramForCausalLM(tiny_config(hc_mult=4, hc_sinkhorn_iters=3))
    assert all(layer.attn_hc.sinkhorn_iters == 3 for layer in model.model.layers)


def test_initial_bias_values():
    connection = HyperConnection(tiny_config(hc_mult=4))
    bias = connection.static_bias()
    assert torch.sigmoid(bias[:4]).allclose(torch.full((4,), 0.25))
    assert torch.equal(bias[4:8], torch.zeros(4))
    assert math.isclose(torch.softmax(bias[8:12], 0)[0].item(), 0.9, rel_tol=1e-6)
