import inspect

import numpy as np
import pytest
import torch
from conftest import tiny_config
from reference_hashing import reference_hash, reference_multipliers, reference_table_sizes

from modeling_engram import EngramConfig, EngramHasher, build_token_map

DEMO_SAMPLE = "Only Alexander the Great could tame the horse Bucephalus."


def demo_config(compressed_vocab_size: int, **overrides) -> EngramConfig:
    """The settings of the paper's engram_demo_v1.py (DeepSeek-V3 tokenizer, layers 1 and 15, N=3, 8 heads)."""
    settings = dict(
        vocab_size=128_815,
        num_hidden_layers=30,
        engram_layer_ids=[1, 15],
        max_ngram_size=3,
        n_head_per_ngram=8,
        n_embed_per_ngram=512,
        engram_vocab_size=[129280 * 5, 129280 * 5],
        engram_seed=0,
        engram_pad_id=2,
        engram_compressed_vocab_size=compressed_vocab_size,
    )
    settings.update(overrides)
    return EngramConfig(**settings)


def reference_ids(config: EngramConfig, token_map: torch.Tensor, input_ids: torch.Tensor, dead=None):
    sizes = reference_table_sizes(config.engram_layer_ids, config.engram_vocab_size, config.n_head_per_ngram)
    multipliers = reference_multipliers(
        config.engram_layer_ids, config.max_ngram_size, config.engram_compressed_vocab_size, config.engram_seed
    )
    lookup = token_map.numpy()
    return reference_hash(
        lookup[input_ids.numpy()],
        config.engram_layer_ids,
        multipliers,
        sizes,
        config.max_ngram_size,
        config.n_head_per_ngram,
        pad_id=int(lookup[config.engram_pad_id]),
        dead=dead,
    )


def assert_bit_identical(ours: dict, reference: dict):
    assert list(ours) == list(reference)
    for layer_id, ids in ours.items():
        assert ids.dtype == torch.long
        np.testing.assert_array_equal(ids.numpy(), reference[layer_id])


@pytest.fixture(scope="module")
def v3_map(deepseek_v3_tokenizer):
    return build_token_map(deepseek_v3_tokenizer)


def test_derived_constants_match_reference(v3_map):
    _, compressed = v3_map
    config = demo_config(compressed)
    sizes = reference_table_sizes(config.engram_layer_ids, config.engram_vocab_size, config.n_head_per_ngram)
    multipliers = reference_multipliers(config.engram_layer_ids, 3, compressed, 0)
    hasher = EngramHasher(config)
    for layer_id in config.engram_layer_ids:
        assert hasher.table_sizes[layer_id] == [p for order in sizes[layer_id] for p in order]
        assert hasher.multipliers[layer_id] == multipliers[layer_id].tolist()
    all_primes = [p for layer in config.engram_table_sizes for p in layer]
    assert len(set(all_primes)) == len(all_primes) == 32
    assert all_primes[0] == 646_403  # smallest prime >= 129280 * 5


def test_demo_sample_bit_identical_on_real_tokenizer(deepseek_v3_tokenizer, v3_map):
    token_map, compressed = v3_map
    config = demo_config(compressed)
    hasher = EngramHasher(config, token_map)
    text = [DEMO_SAMPLE, inspect.getsource(inspect)[:2000]]
    batch = deepseek_v3_tokenizer(text, return_tensors="pt", padding="longest")["input_ids"]
    assert batch.shape[0] == 2 and batch.shape[1] > 400
    ours = hasher(batch)
    assert ours[1].shape == (2, batch.shape[1], 16)
    assert_bit_identical(ours, reference_ids(config, token_map, batch))


@pytest.mark.parametrize("length", [1, 2, 7, 63, 500])
def test_random_ids_over_full_vocabulary(v3_map, length):
    token_map, compressed = v3_map
    config = demo_config(compressed, engram_seed=12345, engram_layer_ids=[0, 7, 29], max_ngram_size=4,
                         engram_vocab_size=[1009, 50_000, 2_000_000], n_head_per_ngram=3,
                         n_embed_per_ngram=96)
    hasher = EngramHasher(config, token_map)
    generator = torch.Generator().manual_seed(length)
    batch = torch.randint(0, config.vocab_size, (3, length), generator=generator)
    batch[0, -1] = config.vocab_size - 1  # extremes of the range
    batch[1, 0] = 0
    assert_bit_identical(hasher(batch), reference_ids(config, token_map, batch))


def test_largest_compressed_ids_do_not_overflow():
    # Identity map with V' = vocab: the biggest ids times the biggest multipliers still fit in int64.
    config = tiny_config(vocab_size=50_000, engram_vocab_size=[3_000_017, 5], engram_seed=7)
    hasher = EngramHasher(config)
    assert max(max(m) for m in config.engram_multipliers) * (50_000 - 1) < 2**63
    batch = torch.full((2, 6), 49_999)
    batch[1, ::2] = 49_998
    ours = hasher(batch)
    for layer_id, ids in ours.items():
        assert (ids >= 0).all() and (ids < torch.tensor(hasher.table_sizes[layer_id])).all()
    assert_bit_identical(ours, reference_ids(config, hasher.token_map, batch))


def test_attention_mask_positions_read_the_pad_id():
    config = tiny_config()
    hasher = EngramHasher(config)
    alone = torch.tensor([[5, 6, 7, 8]])
    padded = torch.tensor([[3, 3, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    for layer_id, ids in hasher(padded, mask).items():
        assert torch.equal(ids[:, 2:], hasher(alone)[layer_id])


def test_hasher_compiles_without_graph_breaks():
    hasher = EngramHasher(tiny_config())
    batch = torch.randint(0, 97, (2, 11))
    compiled = torch.compile(hasher, fullgraph=True, backend="eager")
    for layer_id, ids in compiled(batch).items():
        assert torch.equal(ids, hasher(batch)[layer_id])


def test_a_deliberately_wrong_hasher_fails_the_comparison(v3_map):
    token_map, compressed = v3_map
    config = demo_config(compressed)
    hasher = EngramHasher(config, token_map)
    batch = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    reference = reference_ids(config, token_map, batch)
    assert_bit_identical(hasher(batch), reference)
    hasher.multiplier_tensor[0, 2] += 2  # another odd multiplier for the 3rd position of layer 1
    with pytest.raises(AssertionError):
        assert_bit_identical(hasher(batch), reference)


V41_IMAGE = 129_264  # <｜image2｜>, the image placeholder V4.1 marks dead


def test_deepseek_v41_engram_on_the_v4_tokenizer_matches_the_reference(deepseek_v4_tokenizer):
    """V4.1's Engram hashing (DEEPSEEK_V41_ENGRAM) on real text with image placeholders, against the independent
    reference: its own token map, primes by trial division and the dead-token rule checked position by position."""
    from reference_hashing import reference_token_map

    from modeling_engram import DEEPSEEK_V41_ENGRAM

    assert len(deepseek_v4_tokenizer) == 129_280
    assert deepseek_v4_tokenizer.convert_ids_to_tokens(V41_IMAGE) == "<｜image2｜>"
    reference_map, reference_size = reference_token_map(deepseek_v4_tokenizer)
    token_map, compressed = build_token_map(deepseek_v4_tokenizer)
    assert compressed == reference_size == 99_092
    np.testing.assert_array_equal(token_map.numpy(), reference_map)
    config = EngramConfig(**DEEPSEEK_V41_ENGRAM, num_hidden_layers=16, engram_compressed_vocab_size=compressed)
    assert config.engram_table_sizes[0][0] == 16_000_057  # the smallest prime >= 16,000,000
    hasher = EngramHasher(config, token_map)
    text = [DEMO_SAMPLE, inspect.getsource(inspect)[:1500]]
    batch = deepseek_v4_tokenizer(text, return_tensors="pt", padding="longest")["input_ids"]
    batch[0, 3:5] = V41_IMAGE  # an image between words, and images at the start and in the middle of code
    batch[1, 0] = batch[1, 50] = batch[1, 51] = batch[1, 52] = V41_IMAGE
    ours = hasher(batch)
    assert ours[1].shape == (2, batch.shape[1], 24)
    reference = reference_ids(config, token_map, batch, dead=(batch == V41_IMAGE).numpy())
    assert_bit_identical(ours, reference)
    without_dead = reference_ids(config, token_map, batch)
    assert not np.array_equal(reference[1], without_dead[1])  # the placeholders change the hashes after them
