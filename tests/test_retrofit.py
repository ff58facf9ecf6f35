"""Retrofit: Engram on pretrained Llama, Mistral, Qwen2 and Qwen3 models, exact at step 0; training modes; sharing."""

import copy
import json
import re

import pytest
import torch
from conftest import make_tiny_tokenizer, write_text_files
from safetensors.torch import load_file
from test_hub import assert_same_outputs, clean_load, fake_hub, hub_env, run_python  # noqa: F401 (fake_hub fixture)
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM, TrainingArguments)

from modeling_engram import (EngramForCausalLM, EngramTrainer, create_engram_optimizer, gating_peft_config,
                             text_blocks_dataset)
from modeling_engram.engram_adapter import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, save_engram_adapter
from modeling_engram.retrofit import backbone_lora_config, engram_parameter_names, freeze_backbone
from modeling_engram.training import engram_tables

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}
# Each family with what makes it differ from plain Llama: biases, q/k norms, sliding windows shorter than the
# 64-token generations, tied embeddings, RoPE scaling.
FAMILIES = {
    "llama": (LlamaForCausalLM, LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                                            rope_parameters=LLAMA3_ROPE)),
    "mistral": (MistralForCausalLM, MistralConfig(**COMMON, sliding_window=8, head_dim=16)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**COMMON, head_dim=16, use_sliding_window=True, sliding_window=8,
                                            max_window_layers=2, tie_word_embeddings=True)),
}
ENGRAM = dict(engram_layer_ids=[1], n_head_per_ngram=2, n_embed_per_ngram=16, engram_vocab_size=[101, 103])
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def save_tiny_base(family: str, folder, seed: int = 0):
    """A random tiny base model of `family` with non-trivial biases and norms, saved; its folder."""
    model_class, config = FAMILIES[family]
    torch.manual_seed(seed)
    base = model_class(copy.deepcopy(config))
    with torch.no_grad():
        for name, param in base.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.2)
            elif "norm" in name:
                param.uniform_(0.5, 1.5)
    base.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_base(request, tmp_path_factory):
    """(family, folder, the base model reloaded from it)."""
    folder = save_tiny_base(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, folder, AutoModelForCausalLM.from_pretrained(folder).eval()


def prompts(batch=2, length=9, seed=0):
    return torch.randint(3, 99, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, input_ids, **kwargs):
    return model.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
                          **kwargs)


def test_each_family_is_exact_at_step_0(family_base, tokenizer):
    family, folder, base = family_base
    model = EngramForCausalLM.from_base_model(str(folder), tokenizer, **ENGRAM).eval()
    assert model.config.engram_base_model["architecture"] == type(base).__name__
    ids = prompts(length=40)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            difference = (model(ids, **kwargs).logits - base(ids, **kwargs).logits).abs().max()
            assert difference <= 1e-6, f"{family}: max |logit difference| {difference}"

    short = prompts()
    for use_cache in (True, False):
        expected = greedy(base, short, use_cache=use_cache)
        assert expected.shape[1] == short.shape[1] + NEW_TOKENS
        assert torch.equal(greedy(model, short, use_cache=use_cache), expected), f"{family} use_cache={use_cache}"
    padded, padded_mask = short.clone(), torch.ones_like(short)
    padded[0, :4], padded_mask[0, :4] = 0, 0  # left padding
    assert torch.equal(greedy(model, padded, attention_mask=padded_mask),
                       greedy(base, padded, attention_mask=padded_mask)), f"{family} left padding"


def test_a_base_path_brings_its_tokenizer(tmp_path, tokenizer):
    from modeling_engram import build_token_map

    folder = save_tiny_base("llama", tmp_path / "base")
    tokenizer.save_pretrained(folder)
    model = EngramForCausalLM.from_base_model(str(folder), **ENGRAM)  # no tokenizer: loaded from the folder
    assert model.config.engram_base_model["name_or_path"] == str(folder)
    assert torch.equal(model.model.hasher.token_map, build_token_map(tokenizer, vocab_size=128)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_bases_are_taken_over_exactly(tmp_path, tokenizer, dtype):
    base = AutoModelForCausalLM.from_pretrained(save_tiny_base("qwen3", tmp_path / "base"), dtype=dtype).eval()
    model = EngramForCausalLM.from_base_model(base, tokenizer, **ENGRAM).eval()
    assert {p.dtype for p in model.parameters()} == {dtype}, "Engram's tensors take the base's dtype"
    ids = prompts(length=20)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)


def test_engram_learns_from_the_first_step(family_base, tokenizer):
    _, folder, _ = family_base
    model = EngramForCausalLM.from_base_model(str(folder), tokenizer, **ENGRAM).train()
    engram = model.model.layers[1].engram
    optimizer = create_engram_optimizer(model, lr=1e-2)
    ids = prompts(length=24)
    model(ids, labels=ids).loss.backward()
    assert engram.kv_proj.value_proj.weight.grad.abs().sum() > 0, "the zero-initialised values get a gradient"
    optimizer.step()
    optimizer.zero_grad()
    model(ids, labels=ids).loss.backward()
    assert engram.table.weight.grad.coalesce().values().abs().sum() > 0, "the tables learn from the second step"
    assert engram.kv_proj.key_proj.weight.grad.abs().sum() > 0
    assert engram.kv_proj.value_proj.weight.abs().sum() > 0


@pytest.mark.slow
def test_retrofit_saves_reloads_and_exports_for_remote_code(tmp_path, tokenizer):
    base = save_tiny_base("qwen3", tmp_path / "base")
    model = EngramForCausalLM.from_base_model(str(base), tokenizer, **ENGRAM).eval()
    with torch.no_grad():  # as after training: the memory changes the output
        model.model.layers[1].engram.kv_proj.value_proj.weight.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "retrofitted")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "retrofitted").eval()
    assert reloaded.config.engram_base_model == model.config.engram_base_model
    assert reloaded.config.qk_norm and reloaded.config.layer_types == ["full_attention", "hybrid", "sliding_attention"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    actual, report = clean_load(tmp_path, {"source": str(tmp_path / "retrofitted")})
    assert all(module.startswith("transformers_modules.") for module in report["classes"].values()), report
    from clean_load import outputs

    assert_same_outputs(actual, outputs(model))


def test_compact_adapter_holds_only_engram_and_loads_over_its_base(tmp_path, tokenizer):
    base_folder = save_tiny_base("llama", tmp_path / "base")
    model = EngramForCausalLM.from_base_model(str(base_folder), tokenizer, **ENGRAM).eval()
    with torch.no_grad():
        model.model.layers[1].engram.kv_proj.value_proj.weight.normal_(0, 0.5)
    adapter = save_engram_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in adapter.iterdir()) == sorted([ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME])
    stored = load_file(adapter / ADAPTER_WEIGHTS_NAME)
    assert stored and all(".engram." in name or ".hasher." in name for name in stored)
    assert "model.hasher.token_map" in stored and "model.layers.1.engram.table.weight" in stored
    assert json.loads((adapter / ADAPTER_CONFIG_NAME).read_text())["engram_base_model"]["name_or_path"] == str(
        base_folder)

    ids = prompts(length=20)
    loaded = EngramForCausalLM.from_engram_adapter(adapter).eval()  # the base it records
    over_given = EngramForCausalLM.from_engram_adapter(adapter, base=AutoModelForCausalLM.from_pretrained(base_folder))
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(loaded(ids).logits, expected)
        assert torch.equal(over_given.eval()(ids).logits, expected)

    other_weights = save_tiny_base("llama", tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="weights differ"):
        EngramForCausalLM.from_engram_adapter(adapter, base=str(other_weights))
    other_shape = LlamaForCausalLM(LlamaConfig(**{**COMMON, "intermediate_size": 96}))
    with pytest.raises(ValueError, match="intermediate_size: adapter 64, base 96"):
        EngramForCausalLM.from_engram_adapter(adapter, base=other_shape)
    with pytest.raises(ValueError, match="MistralForCausalLM"):
        EngramForCausalLM.from_engram_adapter(adapter, base=MistralForCausalLM(MistralConfig(**COMMON)))


def test_a_retrofitted_model_quantised_to_fp8_saves_and_loads_as_an_adapter(tmp_path, tokenizer):
    base_folder = save_tiny_base("llama", tmp_path / "base")
    wide = {**ENGRAM, "n_embed_per_ngram": 64}  # heads of 32 values: one FP8 scale block
    model = EngramForCausalLM.from_base_model(str(base_folder), tokenizer, **wide).eval()
    with torch.no_grad():
        model.model.layers[1].engram.kv_proj.value_proj.weight.normal_(0, 0.5)
    model.quantize_engram_tables("fp8_e4m3")
    stored = load_file(save_engram_adapter(model, tmp_path / "adapter") / ADAPTER_WEIGHTS_NAME)
    assert stored["model.layers.1.engram.table.weight"].dtype == torch.float8_e4m3fn
    assert stored["model.layers.1.engram.table.weight_scale"].dtype == torch.uint8
    loaded = EngramForCausalLM.from_engram_adapter(tmp_path / "adapter").eval()
    assert loaded.config.engram_row_format == "fp8_e4m3"
    ids = prompts(length=20)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


HUB_SCRIPT = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
from conftest import make_tiny_tokenizer
from test_retrofit import ENGRAM, save_tiny_base
from modeling_engram import EngramForCausalLM
from modeling_engram.engram_adapter import push_engram_adapter

base = save_tiny_base("qwen2", sys.argv[1])
model = EngramForCausalLM.from_base_model(str(base), make_tiny_tokenizer(), **ENGRAM).eval()
with torch.no_grad():
    model.model.layers[1].engram.kv_proj.value_proj.weight.normal_(0, 0.5)
model.push_to_hub("user/tiny-retrofit")
push_engram_adapter(model, "user/tiny-memory")
ids = torch.arange(3, 23).unsqueeze(0)
with torch.no_grad():
    expected = model(ids).logits
    full = AutoModelForCausalLM.from_pretrained("user/tiny-retrofit").eval()(ids).logits
    compact = EngramForCausalLM.from_engram_adapter("user/tiny-memory").eval()(ids).logits
print("SHARED " + json.dumps({"full": torch.equal(full, expected), "compact": torch.equal(compact, expected)}))
"""


@pytest.mark.slow
def test_full_and_compact_forms_push_and_load_by_repo_id(fake_hub, tmp_path):
    stdout = run_python(["-c", HUB_SCRIPT, str(tmp_path / "base")], hub_env(fake_hub, tmp_path), cwd=tmp_path)
    shared = json.loads(next(line for line in stdout.splitlines() if line.startswith("SHARED "))[7:])
    assert shared == {"full": True, "compact": True}
    assert "model.safetensors" in fake_hub.files("user/tiny-retrofit")
    compact = fake_hub.files("user/tiny-memory")
    assert {ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, "README.md"} <= set(compact)
    assert "model.safetensors" not in compact
    assert len(compact[ADAPTER_WEIGHTS_NAME]) < len(fake_hub.files("user/tiny-retrofit")["model.safetensors"]) / 2
    assert json.dumps(str(tmp_path / "base")) in compact["README.md"].decode(), "the card names the base model"
    assert fake_hub.unhandled == []


def test_model_card_names_a_hub_base_model():
    from modeling_engram import model_card

    for name, expected in (("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
                           ("/data/models/smollm2", None)):
        config = EngramForCausalLM.config_class(**COMMON, **ENGRAM, engram_base_model={"name_or_path": name})
        assert model_card(config).data.base_model == expected


@pytest.fixture(scope="module")
def blocks(tmp_path_factory, tokenizer):
    files = write_text_files(tmp_path_factory.mktemp("text"), count=2, words=400)
    return text_blocks_dataset(files, tokenizer, block_size=32)


def train(model, blocks, folder, steps=6, lr=1e-2):
    args = TrainingArguments(str(folder), max_steps=steps, per_device_train_batch_size=4, learning_rate=lr,
                             report_to=[], save_strategy="no", logging_steps=1, use_cpu=True)
    EngramTrainer(model=model, args=args, train_dataset=blocks).train()
    return model


def loss_on(model, blocks):
    batch = torch.tensor(blocks[:8]["input_ids"])
    with torch.no_grad():
        return float(model.eval()(batch, labels=batch).loss)


def backbone_state(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()
            if ".engram." not in name and ".hasher." not in name}


@pytest.mark.parametrize("storage", ["device", "host"])
def test_engram_only_training_keeps_the_backbone_bit_identical(tmp_path, tokenizer, blocks, storage):
    base = save_tiny_base("qwen3", tmp_path / "base")
    model = EngramForCausalLM.from_base_model(str(base), tokenizer, engram_storage=storage, **ENGRAM)
    assert model.model.layers[1].engram.table.storage.name == storage
    trainable = freeze_backbone(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in engram_parameter_names(model))
    backbone, before = backbone_state(model), loss_on(model, blocks)
    train(model, blocks, tmp_path / "run")
    assert model.model.layers[1].engram.table.sparse, "tables train with sparse updates"
    assert loss_on(model, blocks) < before - 0.05
    for name, tensor in backbone_state(model).items():
        assert torch.equal(tensor, backbone[name]), f"{name} changed under Engram-only training"


def test_engram_plus_lora_trains_both_and_merges(tmp_path, tokenizer, blocks):
    from peft import get_peft_model

    base = save_tiny_base("llama", tmp_path / "base")
    model = EngramForCausalLM.from_base_model(str(base), tokenizer, **ENGRAM)
    backbone = backbone_state(model)
    peft_model = get_peft_model(model, backbone_lora_config(r=4))
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert any("lora_B" in name and "q_proj" in name for name in trainable)
    assert any("engram.modules_to_save.default.table" in name for name in trainable)
    assert not any("lora" in name and ".engram." in name for name in trainable), "no LoRA inside Engram"
    before = loss_on(peft_model, blocks)
    train(peft_model, blocks, tmp_path / "run")
    trained_tables = [t for t in engram_tables(peft_model) if t.weight.requires_grad]
    assert len(trained_tables) == 1 and trained_tables[0].sparse, "PEFT's trained copy of the table updates sparsely"
    after = loss_on(peft_model, blocks)
    assert after < before - 0.05
    merged = peft_model.merge_and_unload()
    assert isinstance(merged, EngramForCausalLM) and loss_on(merged, blocks) == pytest.approx(after, abs=1e-5)
    changed = [name for name, tensor in backbone_state(merged).items() if not torch.equal(tensor, backbone[name])]
    assert any("q_proj" in name for name in changed), "the LoRA deltas merge into the backbone"


def test_full_training_moves_backbone_and_tables(tmp_path, tokenizer, blocks):
    base = save_tiny_base("mistral", tmp_path / "base")
    model = EngramForCausalLM.from_base_model(str(base), tokenizer, **ENGRAM)
    backbone, table = backbone_state(model), model.model.layers[1].engram.table.weight.detach().clone()
    before = loss_on(model, blocks)
    train(model, blocks, tmp_path / "run")
    assert loss_on(model, blocks) < before - 0.05
    assert model.model.layers[1].engram.table.sparse
    assert not torch.equal(model.model.layers[1].engram.table.weight, table)
    assert sum(not torch.equal(t, backbone[n]) for n, t in backbone_state(model).items()) >= len(backbone) - 2


def test_gating_only_peft_on_a_retrofitted_model(tmp_path, tokenizer, blocks):
    from peft import get_peft_model

    from modeling_engram import gating_parameter_names

    base = save_tiny_base("qwen2", tmp_path / "base")
    model = EngramForCausalLM.from_base_model(str(base), tokenizer, **ENGRAM)
    freeze_backbone(model)
    train(model, blocks, tmp_path / "engram", steps=3)  # gives the value projection something to gate
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    gating = set(gating_parameter_names(model))
    peft_model = get_peft_model(model, gating_peft_config())
    train(peft_model, blocks, tmp_path / "gating", steps=3)
    merged = peft_model.merge_and_unload()
    changed = {name for name, tensor in merged.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed and changed <= gating, sorted(changed - gating)


def test_bad_input_is_refused_with_the_value_named(tmp_path, tokenizer):
    base_folder = save_tiny_base("llama", tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(base_folder)
    small = LlamaForCausalLM(LlamaConfig(**{**COMMON, "vocab_size": 64}))
    with pytest.raises(ValueError, match="tokenizer has 99 tokens but the base model's embedding has vocab_size=64"):
        EngramForCausalLM.from_base_model(small, tokenizer, engram_layer_ids=[1])
    for layer_ids in ([3], [-1], []):
        with pytest.raises(ValueError, match=re.escape(f"engram_layer_ids={layer_ids!r} is invalid") + ".* 3 layers"):
            EngramForCausalLM.from_base_model(base, tokenizer, engram_layer_ids=layer_ids)
    mixed = copy.deepcopy(base)
    mixed.model.norm.to(torch.float16)
    with pytest.raises(ValueError, match=r"dtype\(s\) \['torch.float16', 'torch.float32'\]"):
        EngramForCausalLM.from_base_model(mixed, tokenizer, engram_layer_ids=[1])
    quantized = copy.deepcopy(base)
    quantized.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(ValueError, match="quant_method='bitsandbytes'"):
        EngramForCausalLM.from_base_model(quantized, tokenizer, engram_layer_ids=[1])
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4))
    with pytest.raises(ValueError, match="cannot retrofit GPT2LMHeadModel .*LlamaForCausalLM, MistralForCausalLM, "
                                         "Qwen2ForCausalLM, Qwen3ForCausalLM"):
        EngramForCausalLM.from_base_model(gpt2, tokenizer, engram_layer_ids=[1])
    with pytest.raises(TypeError, match="gguf_file"):
        EngramForCausalLM.from_base_model(base, tokenizer, engram_layer_ids=[1], gguf_file="x.gguf")
    with pytest.raises(ValueError, match="engram_storage='disk'"):
        EngramForCausalLM.from_base_model(base, tokenizer, engram_layer_ids=[1], engram_storage="disk")
    with pytest.raises(ValueError, match="needs a retrofitted model"):
        save_engram_adapter(EngramForCausalLM(EngramForCausalLM.config_class(**COMMON, **ENGRAM)), tmp_path / "x")


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2")
def test_smollm2_is_exact_at_step_0_and_engram_only_steps_lower_the_loss(smollm2):
    base, tokenizer, _ = smollm2
    assert base.config.quantization_config.quant_method == "gguf", "loaded from the package's GGUF file"
    assert sum(p.numel() for p in base.parameters()) == 134_515_008 and base.config.tie_word_embeddings
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a 135M-parameter model: the test's budget needs both cores
    try:
        model = EngramForCausalLM.from_base_model(base, tokenizer, engram_layer_ids=[1], n_head_per_ngram=2,
                                                  n_embed_per_ngram=64, engram_vocab_size=[2003, 2003]).eval()
        tokenizer.padding_side = "left"
        batch = tokenizer(["The capital of France is", "def fibonacci(n):\n    "], return_tensors="pt",
                          padding=True)
        assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum(), "the first prompt is padded"
        with torch.no_grad():
            difference = (model(**batch).logits - base(**batch).logits).abs().max()
        assert difference <= 1e-6
        expected = greedy(base, batch["input_ids"], attention_mask=batch["attention_mask"])
        assert torch.equal(greedy(model, batch["input_ids"], attention_mask=batch["attention_mask"]), expected)
        single = batch["input_ids"][1:]  # unpadded: without a cache, compared with the base's cached generation
        assert torch.equal(greedy(model, single, use_cache=False), expected[1:])

        freeze_backbone(model)
        optimizer = create_engram_optimizer(model, lr=3e-3)
        text = tokenizer(["import os\nimport sys\n\ndef main(argv):\n    return os.path.join(sys.prefix, argv[0])\n"]
                         * 2, return_tensors="pt")["input_ids"]
        model.train()
        losses = []
        for _ in range(4):
            loss = model(text, labels=text).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        with torch.no_grad():
            assert losses[0] == pytest.approx(base(text, labels=text).loss.item(), abs=1e-5)
        assert losses[-1] < losses[0] - 1e-3, losses
    finally:
        torch.set_num_threads(threads)
