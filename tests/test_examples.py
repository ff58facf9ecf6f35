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


def knowledge_injection():
    """examples/knowledge_injection.py as a module (examples/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("knowledge_injection", ROOT / "examples" / "knowledge_injection.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_knowledge_recall_equals_greedy_generation_and_seen_prompts_prefix_the_training_text(tiny_tokenizer):
    """Recall's one teacher-forced forward says what greedy decoding says (hits and misses), and a seen prompt's ids
    are exactly the training text's first ids, its answer labelled alone under --loss-on answer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    example = knowledge_injection()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()
    prompts = [torch.randint(3, 99, (length,)).tolist() for length in (3, 5, 8, 5)]
    greedy = [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=3, do_sample=False)[0, len(p):].tolist() for p in prompts]
    answers = [greedy[0], greedy[1][:1], [greedy[2][0], (greedy[2][1] + 1) % 99], [(greedy[3][0] + 1) % 99]]
    assert example.greedy_hits(model, list(zip(prompts, answers)), pad_id=0) == [True, True, False, False]

    fact = example.fictional_facts(1, seed=3)[0]
    seen = next(t for t in fact["test"] if t["kind"] == "seen")
    (ids, labels), = example.training_sequences([fact], tiny_tokenizer, answer_only=True)
    prompt = example.encode(tiny_tokenizer, seen["prompt"])
    answer = example.encode(tiny_tokenizer, seen["answer"])
    assert ids[:len(prompt) + len(answer)] == prompt + answer
    assert [i for i, label in enumerate(labels) if label != -100] == list(range(len(prompt), len(prompt) + len(answer)))
    assert fact["train"][0].startswith(seen["prompt"] + seen["answer"])


@pytest.mark.slow
def test_knowledge_injection_quick_run_learns_the_facts_and_writes_every_output(tmp_path):
    """--quick end to end (a tiny random Llama: no SmolLM2 needed): every method trains, recall of trained facts rises
    above the base's, and results.json, the recall-forgetting plot and the gate heatmap are written."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "knowledge_injection.py"), "--quick", "--no-progress", "--out",
         str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    methods = ["engram", "lora", "lora-large", "full"]
    assert [key for key in results if key not in ("base", "grid", "settings")] == methods
    keys = {"recall_seen", "recall_paraphrase", "known_retained", "general_loss_delta", "trainable_params", "seconds"}
    for method in methods:
        assert keys <= results[method].keys(), method
        assert math.isfinite(results[method]["general_loss_delta"]) and results[method]["general_loss_delta"] != 0
    assert results["base"]["recall_seen"] == 0.0
    for method in ("engram", "full"):  # the trained facts are recalled after training
        assert results[method]["recall_seen"] > results["base"]["recall_seen"] + 0.1, method
    counts = {m: results[m]["trainable_params"] for m in methods}
    assert counts["full"] > counts["engram"] > counts["lora-large"] > counts["lora"] > 0
    assert len(results["grid"]) == 4 and "| engram |" in result.stdout
    for name in ("recall_vs_forgetting.png", "gate_heatmap.png", "gate_heatmap.html"):
        assert (out / name).stat().st_size > 1000, name
