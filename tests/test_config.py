import pytest
from conftest import tiny_config

from modeling_engram import EngramConfig


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(engram_layer_ids=[0, 3]), r"engram_layer_ids=\[0, 3\] is invalid; each id must lie in \[0, 2\]"),
        (dict(engram_layer_ids=[-1]), r"engram_layer_ids=\[-1\] is invalid"),
        (dict(engram_layer_ids=[1, 1]), "must be distinct"),
        (dict(max_ngram_size=1, engram_vocab_size=[]), "max_ngram_size=1 is invalid; it must be >= 2"),
        (dict(engram_vocab_size=[31]), r"engram_vocab_size=\[31\] is invalid; it needs one entry per n-gram order 2..3"),
        (dict(n_embed_per_ngram=15), "n_embed_per_ngram=15 is invalid; it must be divisible by n_head_per_ngram=2"),
        (dict(num_key_value_heads=3), "num_key_value_heads=3 is invalid"),
        (dict(engram_compressed_vocab_size=98), r"engram_compressed_vocab_size=98 is invalid; it must lie in \[1, vocab_size=97\]"),
        (dict(engram_pad_id=97), r"engram_pad_id=97 is invalid"),
        (dict(hc_mult=0), "hc_mult=0 is invalid"),
        (dict(engram_multipliers=[[3, 5, 7]]), r"engram_multipliers has shape \(1, 3\), expected \(2, 3\)"),
        (dict(engram_multipliers=[[3, 5, 8], [1, 1, 1]]), "multiplier 8 is invalid"),
        (dict(engram_table_sizes=[[31, 37, 41, 47], [43, 53, 59, 61]]), "engram_table_sizes .* disagree"),
    ],
)
def test_invalid_settings_name_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_json_round_trip_keeps_derived_constants(tmp_path):
    config = tiny_config(engram_seed=3, hc_mult=4)
    config.save_pretrained(tmp_path)
    reloaded = EngramConfig.from_pretrained(tmp_path)
    assert reloaded.engram_multipliers == config.engram_multipliers
    assert reloaded.engram_table_sizes == config.engram_table_sizes
    assert reloaded.layer_types == ["hybrid", "full_attention", "hybrid"]
    assert reloaded.engram_dim == 2 * 16


def test_demo_defaults():
    config = EngramConfig()
    assert config.engram_layer_ids == [1, 15] and config.max_ngram_size == 3
    assert config.engram_vocab_size == [129280 * 5] * 2 and config.n_head_per_ngram == 8
    assert config.engram_pad_id == 2 and config.engram_seed == 0 and config.engram_kernel_size == 4
