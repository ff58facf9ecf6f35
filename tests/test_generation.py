"""Exact incremental decoding: the cache carries token history and short-conv state, on every backbone (plain
residual, mHC with 4 branches, DeepSeekMoE, mHC + MoE)."""

import pytest
import torch
from conftest import BACKBONES, tiny_model
from transformers import DynamicCache

ATOL = 1e-5


def prompt(batch=2, length=9, seed=0, vocab=97):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_greedy_with_cache_equals_without(hc_model):
    ids = prompt()
    cached = hc_model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True)
    uncached = hc_model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False)
    assert cached.shape == (2, 21)
    assert torch.equal(cached, uncached)


@torch.no_grad()
@pytest.mark.parametrize("chunks", [[1] * 17, [5, 1, 1, 4, 6], [2, 15], [9, 8]], ids=["token", "mixed", "short-then-long", "halves"])
def test_incremental_logits_equal_full_forward(hc_model, chunks):
    ids = prompt(length=sum(chunks))
    full = hc_model(ids).logits
    cache = DynamicCache(config=hc_model.config)
    pieces, start = [], 0
    for size in chunks:
        out = hc_model(ids[:, start : start + size], cache=cache, use_cache=True)
        pieces.append(out.logits)
        start += size
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_engram_state_matters():
    """Guard: without the conv/token state the incremental logits would differ (so the test above can fail)."""
    model = tiny_model()
    ids = prompt(length=12)
    full = model(ids).logits
    cache = DynamicCache(config=model.config)
    model(ids[:, :8], cache=cache, use_cache=True)
    for layer_id in model.config.engram_layer_ids:
        for state in cache.layers[layer_id].conv_states.values():
            state.zero_()
    step = model(ids[:, 8:], cache=cache, use_cache=True).logits
    assert (step - full[:, 8:]).abs().max() > 1e-3


@torch.no_grad()
def test_left_padded_batch_equals_each_sequence_alone(hc_model):
    short, long = prompt(1, 5, seed=1), prompt(1, 9, seed=2)
    pad = hc_model.config.pad_token_id
    batch = torch.cat([torch.cat([torch.full((1, 4), pad), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1), torch.ones(1, 9)]).long()
    out = hc_model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False)
    alone_short = hc_model.generate(short, max_new_tokens=8, do_sample=False)
    alone_long = hc_model.generate(long, max_new_tokens=8, do_sample=False)
    for row, alone in ((out[0, 4:], alone_short[0]), (out[1], alone_long[0])):  # alone stops at eos; the batch pads
        assert torch.equal(row[: len(alone)], alone) and bool((row[len(alone) :] == pad).all())
    # logits too, through the cache: prefill then one step
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = hc_model(batch, attention_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(logits[0, 4:], hc_model(short).logits[0], atol=ATOL, rtol=0)


@torch.no_grad()
def test_beam_search_with_cache_equals_without(hc_model):
    ids = prompt()
    kwargs = dict(max_new_tokens=10, num_beams=3, do_sample=False, num_return_sequences=3, early_stopping=False)
    cached = hc_model.generate(ids, use_cache=True, **kwargs)
    uncached = hc_model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape[0] == 6
    assert torch.equal(cached, uncached)


@torch.no_grad()
def test_continuing_from_a_returned_cache_equals_one_run(hc_model):
    ids = prompt()
    one_run = hc_model.generate(ids, max_new_tokens=12, do_sample=False)
    first = hc_model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    resumed = hc_model.generate(first.sequences, cache=first.cache, max_new_tokens=7, do_sample=False)
    assert torch.equal(resumed, one_run)


@torch.no_grad()
def test_cropped_cache_equals_full_forward(hc_model):
    """Rolling back tokens (as assisted decoding does) restores the token history and the conv state."""
    ids = prompt(length=16)
    full = hc_model(ids).logits
    cache = DynamicCache(config=hc_model.config)
    cache.activate_past_recording()
    hc_model(ids[:, :10], cache=cache, use_cache=True)
    hc_model(prompt(length=4, seed=9), cache=cache, use_cache=True)  # speculative tokens, rejected
    cache.crop(-4)
    assert cache.get_seq_length() == 10
    rest = hc_model(ids[:, 10:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(rest, full[:, 10:], atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("length", [pytest.param(n, id=f"T{n}", marks=[pytest.mark.slow] * (n not in (1, 5, 9)))
                                    for n in range(1, 13)])
def test_every_decoding_strategy_is_exact_on_prompts_shorter_and_longer_than_the_conv_state(hc_model, length):
    """Prompts of 1-12 tokens, around the conv state ((kernel - 1) * max_ngram_size = 9) and the token history (2):
    assisted and prompt-lookup decoding equal greedy; greedy, seeded sampling and beams equal their cache-less runs.
    (Contrastive search left transformers' core in 5.x: it is a Hub `custom_generate` now.)"""
    ids = prompt(batch=1, length=length, seed=length)
    settings = dict(max_new_tokens=6, pad_token_id=0)
    greedy = hc_model.generate(ids, do_sample=False, **settings)
    assert torch.equal(hc_model.generate(ids, do_sample=False, use_cache=False, **settings), greedy)
    assisted = hc_model.generate(ids, do_sample=False, assistant_model=tiny_model(seed=1), **settings)
    assert torch.equal(assisted, greedy)
    assert torch.equal(hc_model.generate(ids, do_sample=False, prompt_lookup_num_tokens=2, **settings), greedy)
    for strategy in (dict(do_sample=True, top_k=5), dict(do_sample=False, num_beams=3)):
        runs = []
        for use_cache in (True, False):
            torch.manual_seed(length)
            runs.append(hc_model.generate(ids, use_cache=use_cache, **strategy, **settings))
        assert torch.equal(*runs), strategy


@torch.no_grad()
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_assisted_generation_equals_greedy(backbone):
    model, draft = tiny_model(seed=0, **BACKBONES[backbone]), tiny_model(seed=1)
    ids = prompt(batch=1)
    greedy = model.generate(ids, max_new_tokens=12, do_sample=False)
    assisted = model.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=draft)
    assert torch.equal(assisted, greedy)


@torch.no_grad()
def test_pipeline_text_generation(tiny_tokenizer):
    from transformers import pipeline

    model = tiny_model(vocab_size=len(tiny_tokenizer))
    generator = pipeline("text-generation", model=model, tokenizer=tiny_tokenizer)
    result = generator("def main():", max_new_tokens=6, do_sample=False)
    prompt_ids = tiny_tokenizer("def main():", return_tensors="pt").input_ids
    expected = model.generate(prompt_ids, max_new_tokens=6, do_sample=False)
    assert expected.shape[1] == prompt_ids.shape[1] + 6
    assert result[0]["generated_text"] == tiny_tokenizer.decode(expected[0], skip_special_tokens=True)


@torch.no_grad()
def test_the_old_past_key_values_name_is_honoured_with_transformers_deprecation_warning(hc_model):
    ids = prompt(length=12)
    full = hc_model(ids).logits
    cache = hc_model(ids[:, :8], use_cache=True).cache
    with pytest.warns(FutureWarning, match="past_key_values"):
        out = hc_model(ids[:, 8:], past_key_values=cache, use_cache=True)
    assert out.cache is cache
    torch.testing.assert_close(out.logits, full[:, 8:], atol=ATOL, rtol=0)
    with pytest.warns(FutureWarning, match="past_key_values"):
        base = hc_model.model(ids[:, :8], past_key_values=DynamicCache(config=hc_model.config), use_cache=True)
    assert base.cache.get_seq_length() == 8


@torch.no_grad()
def test_generate_from_ids_and_embeddings_equals_generate_from_ids(hc_model):
    ids = prompt(length=7)
    expected = hc_model.generate(ids, max_new_tokens=5, do_sample=False)
    embeds = hc_model.get_input_embeddings()(ids)
    both = hc_model.generate(input_ids=ids, inputs_embeds=embeds, max_new_tokens=5, do_sample=False)
    assert torch.equal(both, expected)
    with pytest.raises(ValueError, match="needs the input_ids they embed"):
        hc_model.generate(inputs_embeds=embeds, max_new_tokens=5, do_sample=False)
