"""bench/gpu_check.py: its CPU smoke run end to end, a failing check that does not stop the run, and the time budget."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from kernel_checks import engram_kernels, mutant
from test_gate_kernel import MUTATIONS as GATE_MUTATIONS

sys.path.insert(0, str(Path(ROOT) / "bench"))
import gpu_check  # noqa: E402
import gpu_check_sections as sections  # noqa: E402

SCRIPT = str(Path(ROOT) / "bench" / "gpu_check.py")


def run_gpu_check(out: Path, *options: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    run = subprocess.run([sys.executable, SCRIPT, "--out", str(out), *options], cwd=ROOT, capture_output=True,
                         text=True, timeout=280)
    report = json.loads((out / "gpu_check.json").read_text())
    return run, report, (out / "gpu_check.md").read_text()


@pytest.mark.slow
def test_smoke_run_covers_every_section_and_passes_its_parity_checks(tmp_path):
    run, report, table = run_gpu_check(tmp_path, "--smoke")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert report["smoke"] and report["passed"] and report["environment"]["interpreted"]
    assert {name: s["status"] for name, s in report["sections"].items()} == dict.fromkeys(gpu_check.SHARES, "ok")
    assert report["elapsed_s"] <= report["budget_s"]
    checks = {c["check"]: c for c in report["checks"]}
    expected = [
        "hash: raw ids, mask, offsets, mismatching ids", "hash: against the numpy demo reference, mismatching ids",
        *(f"gather {d}: {what}" for d in ("fp32", "bf16") for what in (
            "forward, mismatching values", "backward (table gradient), rel. error",
            "row gradients (ordered), rel. error", "row gradients (atomic), rel. error")),
        "gather fp8 (V4.1 rows): forward, mismatching values",
        *(f"gate {d}: {what}" for d in ("fp32", "bf16") for what in (
            "forward, rel. error", "backward (5 gradients), largest rel. error")),
        *(f"model {d} hc{m} {c}: {what}" for d in ("fp32", "bf16") for m in (1, 4) for c in ("conv", "no conv")
          for what in ("logits, rel. error", "4 greedy tokens, rows diverging not at a near-tie")),
        "resident: tokens/s", "host, prefetch: tokens/s / resident",
        "host, no prefetch: tokens/s / resident", "disk (page cache warm), prefetch: tokens/s / resident",
        "host, prefetch: last logits vs resident, rel. error", "lookup: Triton hash vs numpy demo hash, speedup",
        "lookup: hash + gather / forward (triton)", "train step (torch): table optimizer state / table bytes",
        "train step (triton): table optimizer state / table bytes",
        *(f"fsdp2 ({d}): loss after 3 steps, relative to the whole model's" for d in ("fp32", "bf16")),
    ]
    assert [name for name in expected if name not in checks] == []
    for name, check in checks.items():
        assert check["passed"] is not False, (name, check)
        if check["threshold"] and "speed not judged" not in check["note"]:  # parity: judged even on the CPU
            assert check["passed"] is True, (name, check)
    # host and disk with prefetch, the hash speedup, the lookup share, the step-time ratio per kernel: measured, and
    # judged only on a GPU
    speeds = [c for c in checks.values() if "speed not judged" in c["note"] and c["threshold"]]
    assert len(speeds) == 6 and all(math.isfinite(c["value"]) for c in speeds)
    assert "CPU smoke run" in table and "not GPU numbers" in table
    assert all(f"| {c['check']} | {c['shown']} |" in table for c in report["checks"])


def test_a_raising_check_and_a_wrong_kernel_fail_their_rows_and_the_section_goes_on(tmp_path, monkeypatch):
    report = sections.Report("kernels", tmp_path / "part.json", smoke=True, deadline=math.inf)
    sizes = sections.SIZES["smoke"]["kernels"]

    def broken(*_):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    report.attempt("hash", broken)
    wrong = mutant(engram_kernels.gate.kernel, *GATE_MUTATIONS["backward-dv-keeps-the-last-branch"])
    monkeypatch.setattr(engram_kernels, "fused_gate", wrong.fused_gate)
    report.attempt("gate fp32", sections.gate_checks, report, sizes, torch.float32)
    saved = json.loads((tmp_path / "part.json").read_text())["checks"]
    assert [(c["check"], c["passed"]) for c in saved] == [
        ("hash", False),
        ("gate fp32: forward, rel. error", True),  # the mutation is in the backward only
        ("gate fp32: backward (5 gradients), largest rel. error", False),
    ]
    assert "illegal memory access" in saved[0]["note"] and "Traceback" in saved[0]["error"]
    assert saved[2]["note"] == "largest for value" and saved[2]["value"] > 0.1


def test_a_section_past_its_time_is_stopped_and_recorded_as_failed(tmp_path):
    part = tmp_path / "kernels.json"
    status, seconds = gpu_check.run_section("kernels", part, timeout=1, smoke=True)  # importing torch takes longer
    assert status == "timeout" and seconds < 10
    checks, _ = gpu_check.section_rows("kernels", part, status)
    assert checks[-1]["passed"] is False and checks[-1]["shown"] == "timeout"


def test_a_spent_budget_skips_sections_and_still_writes_a_failing_report(tmp_path):
    run, report, table = run_gpu_check(tmp_path, "--smoke", "--budget", "10", "--sections", "kernels,train")
    assert run.returncode == 1
    assert not report["passed"] and report["summary"]["skipped"] == 2
    assert {name: s["status"] for name, s in report["sections"].items()} == {"kernels": "skipped", "train": "skipped"}
    assert "| kernels | kernels section | skipped |" in table
