"""The README's main job, the training snippet of docs/training.md and the allocation sweep run end to end (at tiny
sizes)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import require

ROOT = Path(__file__).resolve().parents[1]
for module in ("datasets", "matplotlib", "peft"):  # the scripts run in subprocesses: a missing extra skips here
    require(module)


TINY_MAIN = ["--vocab-size", "600", "--seq-len", "64", "--batch-size", "4", "--hidden", "64", "--experts", "8",
             "--expert-width", "32", "--engram-width", "32", "--val-blocks", "8"]


@pytest.mark.slow
def test_main_job_trains_three_models_per_seed_reports_plots_and_reloads(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "main.py"), "--steps", "6", "--eval-every", "3", "--max-files", "20",
         "--seeds", "0,1", *TINY_MAIN, "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = json.loads((out / "results.json").read_text())
    moe, engram, dense = saved["rows"]
    assert [row["model"] for row in saved["rows"]] == ["MoE", "Engram", "dense"]
    # Engram: the MoE's total and activated parameters, part of its sparse budget moved into tables
    assert engram["total_parameters"] == pytest.approx(moe["total_parameters"], rel=0.02)
    assert engram["active_parameters"] == pytest.approx(moe["active_parameters"], rel=0.005)
    assert engram["flops_per_token"] == pytest.approx(moe["flops_per_token"], rel=0.005)
    assert engram["table_parameters"] > 0 == moe["table_parameters"] == dense["table_parameters"]
    assert abs(dense["flops_per_token"] / engram["flops_per_token"] - 1) <= 0.05  # the compute-matched twin
    assert dense["total_parameters"] < moe["total_parameters"]
    for row in saved["rows"]:  # two seeds each: mean and spread of the per-seed losses
        assert len(row["val_losses"]) == 2 and row["val_losses"][0] != row["val_losses"][1]
        assert row["val_loss"] == pytest.approx(sum(row["val_losses"]) / 2) and row["val_loss_spread"] > 0
        assert math.isfinite(row["val_loss"]) and row["tokens_per_second"] > 0
    gaps = [e - m for e, m in zip(engram["val_losses"], moe["val_losses"])]
    assert engram["val_loss_difference"] == pytest.approx(sum(gaps) / 2)
    assert [len(runs) for runs in saved["runs"].values()] == [2, 2, 2]
    assert "| Engram - MoE |" in result.stdout and "| dense - MoE |" in result.stdout
    assert "completion from the reloaded model" in result.stdout
    for name in ("loss_curves.png", "gate_heatmap.png", "gate_heatmap.html"):
        assert (out / name).stat().st_size > 1000, name
    assert (out / "engram_model" / "model.safetensors").exists() and (out / "engram_model" / "tokenizer.json").exists()


@pytest.mark.slow
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


@pytest.mark.slow
def test_main_job_sweep_trains_the_chosen_models_with_one_setting_changed(tmp_path):
    out = tmp_path / "sweep.jsonl"
    tiny = [f"{option.removeprefix('--').replace('-', '_')}={value}" for option, value in zip(TINY_MAIN[::2], TINY_MAIN[1::2])]
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "main_job_sweep.py"), "--models", "MoE,Engram", "--seeds", "0,1",
         "--out", str(out), "steps=3", "eval_every=3", "max_files=20", "engram_layer=2", *tiny],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["model"], r["seed"]) for r in runs] == [("MoE", 0), ("Engram", 0), ("MoE", 1), ("Engram", 1)]
    assert all(math.isfinite(r["val_loss"]) and r["val_curve"][-1] == [3, r["val_loss"]] for r in runs)
    assert [r["engram_layer_ids"] for r in runs[:2]] == [[], [2]] and runs[0]["n_routed_experts"] == 8


def test_docs_training_snippet_runs(tmp_path, monkeypatch, tiny_tokenizer):
    from conftest import tiny_model, write_text_files

    page = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    start = page.index("```python\n") + len("```python\n")
    code = page[start : page.index("```", start)]
    assert "max_steps=200" in code
    monkeypatch.chdir(tmp_path)
    model = tiny_model(vocab_size=99)
    table = model.model.layers[0].engram.table.weight.detach().clone()
    scope = {"model": model, "tokenizer": tiny_tokenizer, "files": write_text_files(tmp_path / "text")}
    exec(code.replace("max_steps=200", "max_steps=2"), scope)
    assert [group["name"] for group in scope["optimizer"].param_groups] == ["decay", "no_decay", "engram_tables"]
    assert model.model.layers[0].engram.table.sparse and not torch.equal(model.model.layers[0].engram.table.weight, table)


@pytest.mark.slow
def test_main_job_trains_on_a_saved_datasets_dataset(tmp_path):
    from datasets import Dataset, DatasetDict

    from modeling_engram.corpus import read_texts, stdlib_files

    train, validation = stdlib_files(max_files=20)
    data = DatasetDict({"train": Dataset.from_dict({"body": read_texts(train)}),
                        "validation": Dataset.from_dict({"body": read_texts(validation)})})
    data.save_to_disk(tmp_path / "data")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "main.py"), "--dataset", str(tmp_path / "data"), "--text-column",
         "body", "--steps", "4", "--eval-every", "2", *TINY_MAIN, "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "corpus: 18 train / 2 validation documents (dataset)" in result.stdout
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 3


@pytest.mark.slow
def test_retrofit_example_reports_all_four_models_on_a_tiny_base(tmp_path, tiny_tokenizer):
    """examples/retrofit.py end to end on a tiny saved Llama (its default SmolLM2 run: docs/benchmarks.md)."""
    from test_retrofit import save_tiny_base

    base = save_tiny_base("llama", tmp_path / "base")
    tiny_tokenizer.save_pretrained(base)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "retrofit.py"), "--base", str(base), "--gguf-file", "",
         "--max-files", "12", "--steps", "4", "--batch-size", "2", "--block-size", "32", "--eval-blocks", "4",
         "--heads", "2", "--engram-width", "32", "--table-rows", "500", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = {row["model"]: row for row in results["rows"]}
    assert list(rows) == ["base", "Engram-only", "LoRA-only", "Engram + LoRA"]
    assert all(math.isfinite(row["domain_loss"]) and math.isfinite(row["general_loss"]) for row in rows.values())
    assert rows["LoRA-only"]["domain_loss"] != rows["base"]["domain_loss"]
    assert rows["Engram-only"]["trainable"] > rows["LoRA-only"]["trainable"] > 0  # the tables
    assert "| Engram + LoRA |" in result.stdout
    for name in ("loss_curves.png", "gate_heatmap.png", "gate_heatmap.html"):
        assert (out / name).stat().st_size > 1000, name


@pytest.mark.slow
def test_row_format_bench_reports_every_format(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "row_formats.py"), "--batches", "1", "--rounds", "1", "--table-rows",
         "4000", "--gather-rows", "1500", "--steps", "4", "--eval-every", "2", "--max-files", "20",
         *TINY_MAIN, "--engram-width", "128"],  # 4 heads of 32: one FP8 scale block per row
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in result.stdout.splitlines()
            if line.startswith("| ") and line.count("|") == 8}
    assert list(rows) == ["format", "fp32", "bf16", "fp16", "fp8_e4m3"]
    assert [int(rows[name][0]) for name in ("fp32", "bf16", "fp8_e4m3")] == [128, 64, 33]  # bytes per 32-wide row
    assert abs(float(rows["fp8_e4m3"][3])) < 0.05 and float(rows["fp32"][3]) == 0.0
    assert "3.88x smaller" in rows["fp8_e4m3"][1]
    gathers = [line.split("|")[1].strip() for line in result.stdout.splitlines() if line.count("|") == 5]
    assert gathers == ["format", "---", "fp32", "bf16", "fp16", "fp8_e4m3"]
