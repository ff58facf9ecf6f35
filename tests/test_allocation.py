"""Parameter counts and sparsity allocation (paper eq. 7), checked on models built on the meta device.

The paper's 27B setups (Engram paper, Table 1 and the Table 5 backbone): 30 layers, hidden 2560, 32 heads, mHC with
4 branches, vocabulary 129,280 (DeepSeek-V3), DeepSeekMoE with 2 shared experts of width 1536 and top-6 routing.
MoE-27B has 72 routed experts; Engram-27B has 55 and Engram at two layers (orders 2-3, 8 heads each, d_mem 1280,
2,262,400 rows per head table), rho = 74.3%. Not stated in the material we have, inferred here: the first layer is
dense (first_k_dense_replace = 1, width (2 + 6) * 1536 = 12288, iso-FLOPs with the MoE layers): 29 MoE layers are
what makes rho = 74.3% give both 55 experts and ~2.26M rows per head. Attention here is the Llama GQA/MHA block
(32 query and 32 key/value heads of width 80) instead of the paper's MLA; the MLA figures below replace it by
DeepSeek's MLA block with DeepSeek-V2-Lite's ranks (kv_lora_rank 512, no q compression, head dims 128 + 64 rope,
values 128), built from transformers' DeepseekV3Attention.
"""

import pytest
import torch
from conftest import BACKBONES, tiny_config, tiny_model
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

from modeling_engram import EngramConfig, EngramForCausalLM
from modeling_engram.allocation import allocate, count_parameters

PAPER_TOTAL = 26.7e9
PAPER_ACTIVATED = 3.8e9
PAPER_ENGRAM = 5.7e9
PAPER_ROWS_PER_HEAD = 2_262_400


def table5_config(**overrides) -> EngramConfig:
    settings = dict(
        vocab_size=129280, hidden_size=2560, num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=12288, hc_mult=4, n_routed_experts=72, n_shared_experts=2, num_experts_per_tok=6,
        moe_intermediate_size=1536, first_k_dense_replace=1, engram_layer_ids=[], max_ngram_size=3,
        n_head_per_ngram=8, n_embed_per_ngram=640, engram_vocab_size=[PAPER_ROWS_PER_HEAD] * 2,
    )
    settings.update(overrides)
    return EngramConfig(**settings)


def meta_parameters(config: EngramConfig) -> int:
    with torch.device("meta"):
        model = EngramForCausalLM(config)
    assert all(p.is_meta for p in model.parameters())
    return sum(p.numel() for p in model.parameters())


def attention_parameters(config: EngramConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in EngramForCausalLM(config).model.layers[0].self_attn.parameters())


def mla_parameters() -> int:
    mla = DeepseekV3Config(hidden_size=2560, num_attention_heads=32, q_lora_rank=None, kv_lora_rank=512,
                           qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, attention_bias=False)
    with torch.device("meta"):
        return sum(p.numel() for p in DeepseekV3Attention(mla, 0).parameters())


@pytest.fixture(scope="module")
def moe_27b():
    return table5_config()


@pytest.fixture(scope="module")
def engram_27b(moe_27b):
    counts = count_parameters(moe_27b)
    allocation = allocate(table5_config(engram_layer_ids=[2, 15]), counts.total_without_embeddings, counts.activated,
                          rho=0.743)
    return allocation, allocation.apply(table5_config(engram_layer_ids=[2, 15]))


@pytest.mark.parametrize(
    "overrides",
    [*BACKBONES.values(), dict(tie_word_embeddings=True), dict(engram_layer_ids=[]),
     dict(BACKBONES["moe"], hc_mult=2, attention_bias=True, mlp_bias=True), dict(BACKBONES["moe"], n_shared_experts=0)],
    ids=[*BACKBONES, "tied", "no-engram", "hc2-biases", "no-shared"],
)
def test_counts_equal_the_parameters_of_the_built_model(overrides):
    config = tiny_config(**overrides)
    assert count_parameters(config).total == meta_parameters(config)


def test_activated_parameters_leave_out_unchosen_experts_and_unread_rows():
    config = tiny_config(**BACKBONES["hc4-moe"])
    counts = count_parameters(config)
    expert = 3 * 32 * 16
    rows = sum(sum(sizes) for sizes in config.engram_table_sizes) * 8
    read = 2 * 4 * 8  # two Engram layers read one row per head (4 heads of width 8) per token
    assert counts.routed_experts == 2 * 8 * expert and counts.engram_tables == rows
    assert counts.activated == counts.total - counts.embeddings - 2 * (8 - 2) * expert - (rows - read)


def test_moe_27b_lands_near_the_paper_on_the_meta_device(moe_27b):
    counts = count_parameters(moe_27b)
    assert meta_parameters(moe_27b) == counts.total
    assert abs(counts.total - PAPER_TOTAL) / PAPER_TOTAL < 0.01  # 26.88B
    assert counts.total_without_embeddings < PAPER_TOTAL < counts.total  # 26.22B .. 26.88B
    assert abs(counts.activated - PAPER_ACTIVATED) / PAPER_ACTIVATED < 0.05  # 3.64B with GQA


def test_mla_instead_of_gqa_moves_the_counts_by_170m(moe_27b):
    per_layer = mla_parameters() - attention_parameters(moe_27b)
    assert per_layer == 31_883_776 - 26_214_400
    shift = moe_27b.num_hidden_layers * per_layer  # 170.1M, on total and activated alike
    counts = count_parameters(moe_27b)
    assert abs(counts.activated + shift - PAPER_ACTIVATED) / PAPER_ACTIVATED < 0.01  # 3.81B
    assert abs(counts.total + shift - PAPER_TOTAL) / PAPER_TOTAL < 0.015  # 27.05B (26.39B without embeddings)
    assert counts.total_without_embeddings + shift < PAPER_TOTAL < counts.total + shift


def test_engram_27b_allocation_reproduces_the_paper(moe_27b, engram_27b):
    allocation, config = engram_27b
    assert allocation.n_routed_experts == 55
    assert abs(allocation.engram_rows_per_head - PAPER_ROWS_PER_HEAD) / PAPER_ROWS_PER_HEAD < 0.005
    assert abs(allocation.achieved_rho - 0.743) < 0.002
    counts = count_parameters(config)
    assert meta_parameters(config) == counts.total
    assert abs(counts.engram_tables - PAPER_ENGRAM) / PAPER_ENGRAM < 0.02  # 5.80B
    baseline = count_parameters(moe_27b)
    assert abs(counts.total - baseline.total) / baseline.total < 1e-3  # iso-parameter with MoE-27B
    assert abs(counts.activated - baseline.activated) / baseline.activated < 0.01  # iso-FLOPs (+32M Engram dense)
    assert config.engram_layer_ids == [2, 15] and config.n_routed_experts == 55


def test_rho_1_is_the_pure_moe_and_rho_0_keeps_only_the_chosen_experts(moe_27b):
    counts = count_parameters(moe_27b)
    pure = allocate(table5_config(engram_layer_ids=[2, 15]), counts.total_without_embeddings, counts.activated, 1.0)
    assert pure.n_routed_experts == 72 and pure.engram_rows_per_head == 0
    assert count_parameters(pure.apply(table5_config(engram_layer_ids=[2, 15]))).total == counts.total
    memory = allocate(table5_config(engram_layer_ids=[2, 15]), counts.total_without_embeddings, counts.activated, 0.0)
    assert memory.n_routed_experts == 6 and memory.engram_budget == counts.sparse


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(rho=1.5), r"rho=1.5 is invalid; it must lie in \[0, 1\]"),
        (dict(total_parameters=10), "total_parameters=10 is below activated_parameters"),
    ],
)
def test_allocate_refuses_bad_budgets(args, message):
    config = tiny_config(**BACKBONES["moe"])
    settings = dict(total_parameters=10**6, activated_parameters=10**5, rho=0.5) | args
    with pytest.raises(ValueError, match=message):
        allocate(config, **settings)


def test_allocate_needs_moe_shapes():
    with pytest.raises(ValueError, match="n_routed_experts=0"):
        allocate(tiny_config(), 10**6, 10**5, 0.5)


@pytest.mark.parametrize("overrides", [dict(), dict(hc_mult=4), dict(engram_layer_ids=[])], ids=["engram", "mhc", "dense"])
def test_flops_per_token_matches_a_counted_forward(overrides):
    from torch.utils.flop_counter import FlopCounterMode

    from modeling_engram.allocation import flops_per_token

    model = tiny_model(**overrides)
    seq_len = 48
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(3, 97, (2, seq_len)))
    measured = counter.get_total_flops() / (2 * seq_len)
    assert abs(flops_per_token(model.config, seq_len) - measured) / measured < 0.03
