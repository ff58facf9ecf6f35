"""The README's main job and its training snippet run end to end (at tiny sizes)."""

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_main_job_builds_trains_generates_saves_and_reloads(tmp_path):
    out = tmp_path / "model"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "main.py"), "--steps", "8", "--max-files", "20",
         "--vocab-size", "600", "--seq-len", "64", "--batch-size", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "identical logits=True, identical completion=True" in result.stdout
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_readme_training_snippet_runs(tmp_path, monkeypatch, tiny_tokenizer):
    from conftest import tiny_model, write_text_files

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Training") :]
    start = section.index("```python\n") + len("```python\n")
    code = section[start : section.index("```", start)]
    assert "max_steps=200" in code
    monkeypatch.chdir(tmp_path)
    model = tiny_model(vocab_size=99)
    table = model.model.layers[0].engram.table.weight.detach().clone()
    scope = {"model": model, "tokenizer": tiny_tokenizer, "files": write_text_files(tmp_path / "text")}
    exec(code.replace("max_steps=200", "max_steps=2"), scope)
    assert [group["name"] for group in scope["optimizer"].param_groups] == ["decay", "no_decay", "engram_tables"]
    assert model.model.layers[0].engram.table.sparse and not torch.equal(model.model.layers[0].engram.table.weight, table)
