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


RUNTIME = dict(engram_storage="host", engram_prefetch=False, engram_cache_rows=8, engram_kernel="torch")


@pytest.mark.parametrize("key, value", [("engram_storage", "ssd"), ("engram_prefetch", "yes"),
                                        ("engram_cache_rows", -1), ("engram_kernel", "cuda")])
def test_runtime_options_are_checked_however_they_arrive(key, value, tmp_path):
    from huggingface_hub.errors import StrictDataclassError

    refused = (ValueError, StrictDataclassError)  # the strict dataclass checks types first; EngramConfig the values
    with pytest.raises(refused, match=key):
        tiny_config(**{key: value})
    config = tiny_config()
    with pytest.raises(refused, match=key):
        setattr(config, key, value)
    config.save_pretrained(tmp_path)
    with pytest.raises(refused, match=key):
        EngramConfig.from_pretrained(tmp_path, **{key: value})


@pytest.mark.parametrize("storage", ["device", "host", "disk"])
def test_a_model_loaded_with_runtime_options_and_saved_again_writes_none_of_them(storage, tmp_path):
    import json

    from conftest import tiny_model
    from transformers import AutoModelForCausalLM

    tiny_model().save_pretrained(tmp_path / "first")
    options = RUNTIME | dict(engram_storage=storage)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "first", **options)
    assert {key: getattr(loaded.config, key) for key in options} == options  # kept on the loaded model
    assert loaded.model.layers[0].engram.table.storage.name == storage
    loaded.save_pretrained(tmp_path / "again")
    written = json.loads((tmp_path / "again" / "config.json").read_text())
    assert not set(RUNTIME) & set(written)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert again.config.engram_storage == "device" and again.config.engram_cache_rows == 0


def test_runtime_options_stored_by_older_versions_are_ignored_with_a_warning(tmp_path, caplog):
    import json

    from transformers.utils import logging

    tiny_config().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | dict(engram_storage="disk", engram_cache_rows=64)))
    logging.enable_propagation()
    with caplog.at_level("WARNING"):
        config = EngramConfig.from_pretrained(tmp_path)
    assert config.engram_storage == "device" and config.engram_cache_rows == 0
    assert "runtime options, which are not part of the model" in caplog.text
    assert EngramConfig.from_pretrained(tmp_path, engram_storage="host").engram_storage == "host"


def test_with_changes_derives_afresh_and_keeps_the_attention_pattern_and_runtime_options():
    config = tiny_config(sliding_window=4, layer_types=["sliding_attention", "full_attention", "full_attention"],
                         **RUNTIME)
    changed = config.with_changes(engram_layer_ids=[1], hidden_size=64)
    assert changed.layer_types == ["sliding_attention", "hybrid", "full_attention"]
    assert changed.engram_table_sizes == tiny_config(engram_layer_ids=[1]).engram_table_sizes
    assert changed.engram_multipliers == tiny_config(engram_layer_ids=[1]).engram_multipliers
    assert {key: getattr(changed, key) for key in RUNTIME} == RUNTIME
    assert changed.hidden_size == 64 and config.hidden_size == 32
    assert config.with_changes(num_hidden_layers=4, engram_layer_ids=[0]).layer_types == ["hybrid_sliding", *["sliding_attention"] * 3]
