"""DeepSeekMoE FFN: routing, auxiliary-loss-free balancing bias updates, expert compute paths, layer layout."""

import pytest
import torch
from conftest import TINY_MOE, tiny_config, tiny_model
from torch.nn import functional as F
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

from modeling_engram.moe import EngramMoE, EngramTopKRouter


def ids(batch=2, length=11, seed=0):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def routers(model):
    return [m for m in model.modules() if isinstance(m, EngramTopKRouter)]


def test_first_k_dense_replace_keeps_the_leading_layers_dense():
    model = tiny_model(**TINY_MOE)
    assert [type(layer.mlp) for layer in model.model.layers] == [LlamaMLP, EngramMoE, EngramMoE]
    assert all(type(layer.mlp) is LlamaMLP for layer in tiny_model().model.layers)  # default: dense


def test_balancing_bias_is_a_saved_buffer_not_a_parameter(tmp_path):
    model = tiny_model(**TINY_MOE)
    names = dict(model.named_parameters())
    assert not any("e_score_correction_bias" in n or "expert_load" in n for n in names)
    state = model.state_dict()
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in state
    assert not any("expert_load" in n for n in state)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    for before, after in zip(routers(model), routers(reloaded)):
        assert torch.equal(before.e_score_correction_bias, after.e_score_correction_bias)
    batch = ids()
    assert torch.equal(reloaded(batch).logits, model(batch).logits)


def test_update_moves_each_bias_by_gamma_towards_the_mean_load():
    model = tiny_model(router_bias_update_speed=0.01, **TINY_MOE).train()
    before = [r.e_score_correction_bias.clone() for r in routers(model)]
    batch = ids()
    model(batch, labels=batch).loss.backward()
    loads = [r.expert_load.clone() for r in routers(model)]
    for load in loads:
        assert load.sum() == batch.numel() * TINY_MOE["num_experts_per_tok"]
        assert load.max() > load.min()
    model.update_router_biases()
    for router, old, load in zip(routers(model), before, loads):
        step = router.e_score_correction_bias - old
        torch.testing.assert_close(step, 0.01 * torch.sign(load.mean() - load), atol=1e-7, rtol=0)
        assert router.e_score_correction_bias.grad is None
        assert router.expert_load.sum() == 0
    after = [r.e_score_correction_bias.clone() for r in routers(model)]
    model.update_router_biases()  # nothing counted since: no change
    assert all(torch.equal(a, r.e_score_correction_bias) for a, r in zip(after, routers(model)))


def test_bias_update_evens_out_a_skewed_router():
    """Repeated updates steer tokens away from an expert the router weights favour, with no gradient at all."""
    config = tiny_config(n_routed_experts=8, num_experts_per_tok=2, router_bias_update_speed=0.02)
    router = EngramTopKRouter(config).train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.normal_(0, 0.1, generator=generator)
        router.weight[0] += 1.0  # expert 0 wins for most tokens
    hidden = torch.randn(512, 32, generator=generator) + 0.5

    def imbalance():
        router(hidden)
        load = router.expert_load.clone()
        return (load.max() / load.mean()).item(), load

    start, load = imbalance()
    router.expert_load.zero_()
    assert start > 2.0 and load[0] > 450
    for _ in range(200):
        router(hidden)
        router.update_bias()
    end, _ = imbalance()
    assert end < 1.5  # max / mean load; the bias then oscillates by gamma around balance
    assert router.e_score_correction_bias[0] == router.e_score_correction_bias.min()


@torch.no_grad()
def test_eval_and_generation_leave_the_bias_unchanged():
    model = tiny_model(**TINY_MOE)
    before = [r.e_score_correction_bias.clone() for r in routers(model)]
    model.generate(ids(), max_new_tokens=6, do_sample=False)
    model(ids(), labels=ids())
    assert all(r.expert_load.sum() == 0 for r in routers(model))
    model.update_router_biases()
    assert all(torch.equal(b, r.e_score_correction_bias) for b, r in zip(before, routers(model)))


def test_padding_is_not_counted_as_load():
    model = tiny_model(**TINY_MOE).train()
    batch = ids()
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    model(batch, attention_mask=mask)
    for router in routers(model):
        assert router.expert_load.sum() == int(mask.sum()) * TINY_MOE["num_experts_per_tok"]


@torch.no_grad()
def test_bias_steers_the_choice_and_the_scores_weight_it():
    config = tiny_config(n_routed_experts=8, num_experts_per_tok=2, routed_scaling_factor=2.5)
    router = EngramTopKRouter(config).eval()
    router.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    router.e_score_correction_bias[5] = 10.0  # chosen for every token
    router_logits, weights, expert_ids = router(hidden)
    assert (expert_ids == 5).any(-1).all()
    torch.testing.assert_close(router_logits, hidden @ router.weight.T)
    scores = torch.sigmoid(router_logits)
    chosen = scores.gather(-1, expert_ids)
    torch.testing.assert_close(weights, 2.5 * chosen / chosen.sum(-1, keepdim=True))
    torch.testing.assert_close(weights.sum(-1), torch.full((64,), 2.5))


def per_token_reference(experts, hidden, expert_ids, weights):
    """One token at a time, one expert at a time: the plain definition of the routed output."""
    rows = []
    for token in range(hidden.shape[0]):
        total = torch.zeros(hidden.shape[1])
        for slot in range(expert_ids.shape[1]):
            e = expert_ids[token, slot]
            gate, up = F.linear(hidden[token], experts.gate_up_proj[e]).chunk(2)
            total = total + weights[token, slot] * F.linear(F.silu(gate) * up, experts.down_proj[e])
        rows.append(total)
    return torch.stack(rows)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_expert_implementations_match_the_per_token_definition(implementation):
    model = tiny_model(**TINY_MOE)
    model.set_experts_implementation(implementation)
    experts = model.model.layers[1].mlp.experts
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 32, generator=generator, requires_grad=True)
    expert_ids = torch.stack([torch.randperm(8, generator=generator)[:2] for _ in range(37)])
    expert_ids[:, 0] = torch.where(torch.arange(37) < 20, 3, expert_ids[:, 0])  # one crowded expert
    expert_ids[:, 1] = torch.where(expert_ids[:, 1] == 3, 4, expert_ids[:, 1])
    weights = torch.rand(37, 2, generator=generator)
    output = experts(hidden, expert_ids, weights)
    expected = per_token_reference(experts, hidden, expert_ids, weights)
    torch.testing.assert_close(output, expected, atol=1e-6, rtol=1e-5)
    grad = torch.autograd.grad(output.square().sum(), [hidden, experts.gate_up_proj])
    grad_expected = torch.autograd.grad(expected.square().sum(), [hidden, experts.gate_up_proj])
    for got, want in zip(grad, grad_expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_model_logits_do_not_depend_on_the_experts_implementation():
    model = tiny_model(hc_mult=4, **TINY_MOE)
    batch = ids()
    logits = {}
    for implementation in ("eager", "grouped_mm", "batched_mm"):
        model.set_experts_implementation(implementation)
        logits[implementation] = model(batch).logits
    torch.testing.assert_close(logits["grouped_mm"], logits["eager"], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits["batched_mm"], logits["eager"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dense", [dict(), dict(TINY_MOE, first_k_dense_replace=3)], ids=["no-experts", "all-dense"])
def test_a_dense_model_refuses_an_experts_implementation_by_name(dense, tmp_path):
    model = tiny_model(**dense)
    assert model.config._experts_implementation == "eager"
    for implementation in ("grouped_mm", "batched_mm"):
        with pytest.raises(ValueError, match=r"has no experts \(n_routed_experts=.*does not apply"):
            model.set_experts_implementation(implementation)
    model.set_experts_implementation("eager")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no experts"):
        AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="grouped_mm")
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._experts_implementation == "eager"


@torch.no_grad()
def test_output_router_logits_returns_every_moe_layers_router_logits():
    model, batch = tiny_model(hc_mult=4, **TINY_MOE), ids()
    out = model(batch, output_router_logits=True)
    gates = [layer.mlp.gate for layer in model.model.layers[TINY_MOE["first_k_dense_replace"]:]]
    flat = batch.numel()
    assert [tuple(logits.shape) for logits in out.router_logits] == [(flat, 8)] * len(gates)
    assert out.aux_loss is None  # auxiliary-loss-free balancing
    assert model(batch).router_logits is None
    assert tiny_model()(batch, output_router_logits=True).router_logits == ()  # dense: no router


def test_an_moe_model_takes_grouped_mm_by_default():
    assert tiny_model(**TINY_MOE).config._experts_implementation == "grouped_mm"


def test_shared_experts_are_one_mlp_of_n_shared_widths():
    moe = tiny_model(**{**TINY_MOE, "n_shared_experts": 3}).model.layers[1].mlp
    assert moe.shared_experts.gate_proj.weight.shape == (3 * 16, 32)
    assert tiny_model(**{**TINY_MOE, "n_shared_experts": 0}).model.layers[1].mlp.shared_experts is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_routed_experts=4, num_experts_per_tok=6), r"num_experts_per_tok=6 is invalid; it must lie in \[1, n_routed_experts=4\]"),
        (dict(n_routed_experts=-1), "n_routed_experts=-1 is invalid"),
        (dict(n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=4), r"first_k_dense_replace=4 is invalid; it must lie in \[0, num_hidden_layers=3\]"),
        (dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=0), "moe_intermediate_size=0 is invalid"),
        (dict(n_routed_experts=4, num_experts_per_tok=2, router_bias_update_speed=-0.1), "router_bias_update_speed=-0.1 is invalid"),
        (dict(n_routed_experts=4, num_experts_per_tok=2, routed_scaling_factor=0), "routed_scaling_factor=0 is invalid"),
        (dict(hc_sinkhorn_iters=0), "hc_sinkhorn_iters=0 is invalid; it must be >= 1"),
    ],
)
def test_invalid_moe_and_mhc_settings_name_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)
