"""Hub export: code export and clean-environment loading, push_to_hub against a local fake Hub, the model card."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from clean_load import ATTENTION_MASK, INPUT_IDS, outputs
from conftest import source_copy, tiny_model
from fake_hub import FakeHub
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers.dynamic_module_utils import get_relative_import_files

import modeling_engram
from modeling_engram import EngramForCausalLM, exported_code_files, model_card
from modeling_engram.hub import CARD_TEMPLATE

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
PACKAGE_DIR = Path(modeling_engram.__file__).parent
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".h5", ".msgpack")


def run_python(args: list[str], env: dict, cwd: Path, timeout: int = 240) -> str:
    result = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    assert "Do you wish to run the custom code?" not in result.stdout, "a load asked for trust_remote_code"
    return result.stdout


def clean_load(tmp_path: Path, spec: dict, env: dict | None = None) -> tuple[dict, dict]:
    """Run tests/clean_load.py in a fresh interpreter that cannot import modeling_engram; its outputs and report."""
    spec = {"out": str(tmp_path / "clean_outputs.safetensors"), "report": str(tmp_path / "clean_report.json"),
            "package_dir": str(PACKAGE_DIR), **spec}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**(env or os.environ), "HF_HOME": str(tmp_path / "hf_home_clean")}
    env.pop("PYTHONPATH", None)  # -I ignores it anyway; leave no doubt
    run_python(["-I", str(TESTS / "clean_load.py"), str(tmp_path / "spec.json")], env, cwd=tmp_path)
    return load_file(spec["out"]), json.loads(Path(spec["report"]).read_text())


def assert_same_outputs(actual: dict, expected: dict) -> None:
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), f"{name} differs from the package model's"




def test_exported_files_are_the_modeling_files_closure():
    files = exported_code_files()
    modeling_file = PACKAGE_DIR / "modeling_engram.py"
    # set: transformers lists a module once per file of one import level that imports it (kernel_dispatch: three)
    transformers_copies = {Path(f).name for f in get_relative_import_files(modeling_file)}
    assert files[0] == "modeling_engram.py" and sorted(files[1:]) == sorted(transformers_copies)
    assert {"configuration_engram.py", "hashing.py", "memory.py", "engram_layer.py"} <= set(files)
    helpers = {"hub.py", "token_map.py", "retrofit.py", "engram_adapter.py", "__init__.py", "training.py",
               "sharded_training.py", "data.py", "corpus.py", "visualize.py", "allocation.py", "serving.py"}
    assert not helpers & set(files), "package helpers must stay out of the export"


def test_the_exported_files_only_run_models():
    """No training, benchmark or plotting code in what trust_remote_code runs: such code lives in package modules
    (training.py, sharded_training.py, visualize.py, corpus.py) and bench/."""
    training_only = ["register_optimizer_step_pre_hook", "clip_grad", "load_into_shards", "Trainer", "matplotlib",
                     "plot_", "counter", "corpus", "bench"]
    for name in exported_code_files():
        source = (PACKAGE_DIR / name).read_text()
        code = "\n".join(line.split("#")[0] for line in source.splitlines())  # comments may name them
        found = [word for word in training_only if word in code]
        assert not found, f"{name} holds {found}"


@pytest.mark.parametrize(
    "line", ["from . import memory", "from .. import memory", "from .missing import thing", "from .sub.module import x"]
)
def test_imports_that_transformers_would_not_export_are_refused(tmp_path, line):
    (tmp_path / "memory.py").write_text("X = 1\n")
    (tmp_path / "modeling_x.py").write_text(f"import torch\ntry:\n    {line}\nexcept ImportError:\n    pass\n")
    with pytest.raises(ValueError, match="modeling_x.py:3"):
        exported_code_files(tmp_path / "modeling_x.py")


def test_exported_files_follow_imports_transitively_and_inside_try(tmp_path):
    (tmp_path / "modeling_x.py").write_text("from .a import A\n")
    (tmp_path / "a.py").write_text("try:\n    from .fast import kernel\nexcept ImportError:\n    kernel = None\n")
    (tmp_path / "fast.py").write_text("from .a2 import B\n")
    (tmp_path / "a2.py").write_text("B = 2\n")
    assert exported_code_files(tmp_path / "modeling_x.py") == ["modeling_x.py", "a.py", "fast.py", "a2.py"]
    transformers_copies = [Path(f).name for f in get_relative_import_files(tmp_path / "modeling_x.py")]
    assert sorted(transformers_copies) == ["a.py", "a2.py", "fast.py"]


@pytest.mark.slow
@torch.no_grad()
def test_saved_folder_loads_with_remote_code_in_a_clean_environment(tmp_path):
    # sdpa, as from_pretrained picks by default: identical outputs need the same attention kernel on both sides
    model = tiny_model(hc_mult=4, engram_compressed_vocab_size=60, attn_implementation="sdpa")
    model.set_token_map(torch.arange(97) % 60)
    export = tmp_path / "tiny-engram"
    model.save_pretrained(export)

    saved = sorted(p.name for p in export.iterdir())
    assert sorted(p for p in saved if p.endswith(".py")) == sorted(exported_code_files())
    assert not [p for p in saved if p.endswith(WEIGHT_SUFFIXES)] and "model.safetensors" in saved
    auto_map = json.loads((export / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_engram.EngramConfig",
        "AutoModel": "modeling_engram.EngramModel",
        "AutoModelForCausalLM": "modeling_engram.EngramForCausalLM",
    }

    broken = tmp_path / "tiny-engram-broken"  # shows that the clean environment notices a missing code file
    shutil.copytree(export, broken)
    (broken / exported_code_files()[-1]).unlink()

    actual, report = clean_load(tmp_path, {"source": str(export), "broken_source": str(broken)})
    assert report["broken_error"] is not None and exported_code_files()[-1].removesuffix(".py") in report["broken_error"]
    assert report["from_package_dir"] == []
    assert all(module.startswith("transformers_modules.") for module in report["classes"].values()), report
    expected = outputs(model)
    expected["base_hidden"] = model.model(
        torch.tensor(INPUT_IDS), attention_mask=torch.tensor(ATTENTION_MASK)
    ).last_hidden_state
    assert_same_outputs(actual, expected)


def test_weights_load_from_safetensors_only(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="safetensors only"):
        EngramForCausalLM.from_pretrained(tmp_path, use_safetensors=False)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle: must not be loaded
    with pytest.raises(OSError, match="model.safetensors"):
        EngramForCausalLM.from_pretrained(tmp_path)




@pytest.fixture
def fake_hub():
    with FakeHub(lifetime_s=300) as hub:
        yield hub


def hub_env(hub: FakeHub, tmp_path: Path) -> dict:
    return {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": "hf_fake_token",
        "HF_HOME": str(tmp_path / "hf_home_push"),
        "HF_HUB_DISABLE_XET": "1",  # hf_xet would upload LFS files through Xet, which the fake Hub does not offer
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "0",  # the fake Hub is local: an offline setting meant for the real Hub must not block it
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]),
    }


PUSH_SCRIPT = r"""
import json, sys
import torch
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from clean_load import ATTENTION_MASK, INPUT_IDS, outputs
from conftest import make_tiny_tokenizer, tiny_model

out = sys.argv[1]
tokenizer = make_tiny_tokenizer()
first = tiny_model(seed=0, vocab_size=len(tokenizer), attn_implementation="sdpa")
infos = [first.push_to_hub("tiny-engram", license="apache-2.0", training_data="Python standard-library source.",
                           eval_results=[{"dataset_name": "stdlib-val", "dataset_split": "validation",
                                          "metric_type": "perplexity", "metric_value": 41.5}])]
infos.append(tokenizer.push_to_hub("user/tiny-engram"))

api = HfApi()
card = ModelCard.load("user/tiny-engram")  # the owner edits the card body on the Hub
card.text = card.text + "\n## Notes from the owner\n\nEdited on the Hub.\n"
infos.append(api.upload_file(path_or_fileobj=str(card).encode(), path_in_repo="README.md", repo_id="user/tiny-engram"))
edited = str(card)

second = tiny_model(seed=1, vocab_size=len(tokenizer), attn_implementation="sdpa")  # new weights, pushed over the first
infos.append(second.push_to_hub("user/tiny-engram", commit_message="Second push"))

reloaded = AutoModelForCausalLM.from_pretrained("user/tiny-engram").eval()  # with the package: no remote code
same = all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), second.state_dict().values()))

tokenizer.push_to_hub("user/tokenizer-first")  # transformers writes its placeholder card ...
first.push_to_hub("user/tokenizer-first")  # ... which the Engram card replaces

save_file({k: v.contiguous() for k, v in outputs(second, tokenizer).items()}, out)
print("PUSHED " + json.dumps({"commits": [str(i.oid) for i in infos], "edited_card": edited,
                              "reloaded_with_package": type(reloaded).__module__, "same_weights": same}))
"""


@pytest.mark.slow
def test_push_to_hub_and_load_by_repo_id_in_a_clean_process(fake_hub, tmp_path):
    env = hub_env(fake_hub, tmp_path)
    reference = tmp_path / "reference.safetensors"
    stdout = run_python(["-c", PUSH_SCRIPT, str(reference)], env, cwd=tmp_path)
    pushed = json.loads(next(line for line in stdout.splitlines() if line.startswith("PUSHED "))[7:])
    assert pushed["same_weights"] and pushed["reloaded_with_package"] == "modeling_engram.modeling_engram"

    files = fake_hub.files("user/tiny-engram")
    assert sorted(files) == sorted(
        [".gitattributes", "README.md", "config.json", "generation_config.json", "model.safetensors",
         "tokenizer.json", "tokenizer_config.json", *exported_code_files()]
    )
    repo = fake_hub.repos["user/tiny-engram"]
    assert [c.sha for c in repo.commits[1:]] == pushed["commits"] and repo.head.message == "Second push"
    assert repo.head.files["model.safetensors"].lfs, "weights go through the LFS upload path"
    assert files["README.md"].decode() == pushed["edited_card"], "a later push_to_hub kept the card body"
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "engram" in card.data.tags and "Python standard-library source." in card.text
    first_card = ModelCard(fake_hub.files("user/tiny-engram", repo.commits[1].sha)["README.md"].decode())
    assert first_card.text + "\n## Notes from the owner\n\nEdited on the Hub.\n" == card.text

    replaced = ModelCard(fake_hub.files("user/tokenizer-first")["README.md"].decode())
    assert "engram" in replaced.data.tags and "## Architecture" in replaced.text
    assert "automatically generated" not in replaced.text

    actual, report = clean_load(tmp_path, {"source": "user/tiny-engram", "tokenizer": True, "push_to": "user/again"},
                                env=env)
    assert all(module.startswith("transformers_modules.") for module in report["classes"].values()), report
    assert_same_outputs(actual, load_file(reference))

    again = fake_hub.files("user/again")  # pushed by the remote code itself: the export survives a round trip
    assert set(exported_code_files()) <= set(again) and "model.safetensors" in again
    assert set(json.loads(again["config.json"])["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    assert "automatically generated" in again["README.md"].decode(), "without the package: transformers' own card"
    assert fake_hub.unhandled == [], "the client used endpoints the fake Hub does not implement"




def test_model_card_metadata_and_architecture():
    model = tiny_model(hc_mult=4, engram_compressed_vocab_size=60)
    card = model_card(model, repo_id="someone/tiny-engram", tags=["code"])
    metadata = yaml.safe_load(str(card).split("---")[1])
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-generation"
    assert metadata["tags"] == ["engram", "conditional-memory", "code"]
    assert "model-index" not in metadata and "license" not in metadata
    text = card.text
    config = model.config
    rows = [sum(sizes) for sizes in config.engram_table_sizes]
    head_dim = config.n_embed_per_ngram // config.n_head_per_ngram
    assert f"| Engram layers | {config.engram_layer_ids[0]}, {config.engram_layer_ids[1]} " in text
    assert f"| decoder layers / hidden size | {config.num_hidden_layers} / {config.hidden_size} " in text
    assert f"| residual branches (`hc_mult`) | 4 |" in text
    assert f"| n-gram orders | 2, 3: {config.n_head_per_ngram} hash heads each" in text
    assert f"| table rows | {sum(rows):,} " in text
    assert f"({sum(rows) * head_dim * 4:,} bytes) in float32" in text
    assert "| compressed vocabulary | 60 of 97 token ids (38.14% fewer) |" in text
    assert "bit-identical to the paper's `engram_demo_v1.py`" in text
    sizes = config.engram_table_sizes[0]
    assert f"| {config.engram_layer_ids[0]} | {rows[0]:,} | " in text and f"n=2: {sizes[0]}, {sizes[1]}; n=3:" in text
    assert 'from_pretrained("someone/tiny-engram", trust_remote_code=True)' in text
    assert 'from_pretrained("someone/tiny-engram")\n' in text and "import modeling_engram" in text
    assert ", ".join(f"`{f}`" for f in exported_code_files()) in text
    assert "## Placing the tables" in text and "model.layers.<i>.engram.table.weight" in text
    assert "## Training data" not in text and "## Evaluation results" not in text


def test_model_card_training_data_and_evaluation_results():
    card = model_card(
        tiny_model(),
        model_name="tiny",
        license="apache-2.0",
        datasets=["wikitext"],
        training_data="Python standard-library source.",
        eval_results=[{"dataset_name": "stdlib-val", "dataset_split": "validation", "metric_type": "perplexity",
                       "metric_value": 41.5}],
    )
    metadata = yaml.safe_load(str(card).split("---")[1])
    assert metadata["license"] == "apache-2.0" and metadata["datasets"] == ["wikitext"]
    assert metadata["model-index"][0]["results"][0]["metrics"] == [{"type": "perplexity", "value": 41.5}]
    assert "## Training data\n\nPython standard-library source." in card.text
    assert "[wikitext](https://huggingface.co/datasets/wikitext)" in card.text
    assert "| stdlib-val | validation | perplexity | 41.5 |" in card.text
    assert ModelCard(str(card)).data.eval_results[0].metric_value == 41.5


def test_model_card_from_a_config_uses_its_dtype():
    config = tiny_model().config
    config.dtype = "bfloat16"
    card = model_card(config)
    rows = sum(sum(sizes) for sizes in config.engram_table_sizes)
    assert f"({rows * 8 * 2:,} bytes) in bfloat16" in card.text and "| parameters |" not in card.text


WHEEL_SCRIPT = r"""
import sys
from pathlib import Path
import modeling_engram
from conftest import source_copy, tiny_model

assert Path(modeling_engram.__file__).is_relative_to(sys.argv[1]), modeling_engram.__file__  # the wheel's copy
model = tiny_model()
card = modeling_engram.model_card(model, repo_id="user/wheel-engram", license="apache-2.0")
model.push_to_hub("user/wheel-engram", license="apache-2.0")
print("CARD " + str(card).splitlines()[0])
"""


@pytest.mark.install
@pytest.mark.slow
def test_card_template_has_one_copy_at_the_top_and_works_from_a_wheel(fake_hub, tmp_path):
    assert (ROOT / CARD_TEMPLATE).is_file() and not (PACKAGE_DIR / CARD_TEMPLATE).exists(), "one template, at the top"
    source = source_copy(tmp_path)
    run_python(["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
                str(source)], dict(os.environ), cwd=tmp_path)
    import zipfile

    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if n.endswith(CARD_TEMPLATE)] == [f"modeling_engram/{CARD_TEMPLATE}"]
    installed = tmp_path / "installed"
    run_python(["-m", "pip", "install", "--no-deps", "-q", "--target", str(installed), str(wheel)], dict(os.environ),
               cwd=tmp_path)
    env = {**hub_env(fake_hub, tmp_path), "PYTHONPATH": os.pathsep.join([str(installed), str(TESTS)])}
    stdout = run_python(["-c", WHEEL_SCRIPT, str(installed)], env, cwd=tmp_path)
    assert "CARD ---" in stdout  # metadata rendered from the template
    pushed = ModelCard(fake_hub.files("user/wheel-engram")["README.md"].decode())
    assert "engram" in pushed.data.tags and "## Architecture" in pushed.text


@pytest.mark.notebook
@pytest.mark.slow
def test_share_on_the_hub_notebook_runs_against_the_fake_hub(fake_hub, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "examples" / "share_on_the_hub.ipynb", as_version=4)
    env = {**hub_env(fake_hub, tmp_path), "ENGRAM_HUB_REPO": "user/notebook-engram"}
    NotebookClient(notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                   ).execute(env=env)
    printed = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "identical logits: True" in printed and "identical logits from the Hub: True" in printed
    files = fake_hub.files("user/notebook-engram")
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", *exported_code_files()} <= set(files)
    assert "None: random weights" in files["README.md"].decode()
    assert (tmp_path / "outputs" / "share_on_the_hub" / "model.safetensors").exists()
    assert fake_hub.unhandled == []
