"""The README's main job, its training snippet and the allocation sweep run end to end (at tiny sizes)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
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


def test_allocation_sweep_trains_every_rho_and_plots(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "allocation_sweep.py"), "--steps", "20", "--max-files", "20",
         "--vocab-size", "400", "--rhos", "1.0,0.5", "--val-chunks", "4", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = json.loads((tmp_path / "allocation_sweep.json").read_text())["results"]
    assert [(r["rho"], r["n_routed_experts"], r["engram_rows_per_head"] > 0) for r in runs] == [(1.0, 32, False), (0.5, 17, True)]
    assert runs[0]["total_without_embeddings"] == pytest.approx(runs[1]["total_without_embeddings"], rel=0.02)
    assert (tmp_path / "allocation_sweep.png").stat().st_size > 10_000


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
