"""Data-parallel training on the CPU (gloo, 2 processes) equals one process on the combined batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_tokenizer, tiny_model, write_text_files
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "examples" / "train.py")
# Per process: 2 blocks x 2 accumulation steps; the clipping threshold (0.5) is below the gradient norms (~1).
TRAIN = ["--block-size", "24", "--grad-accum", "2", "--steps", "4", "--lr", "1e-2", "--max-grad-norm", "0.5"]


def run(command: list[str], cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reports(folder: Path, name: str) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(folder.glob(f"{name}.rank*"))]


def curve(report: dict) -> list[tuple[float, float]]:
    return [(entry["loss"], entry["grad_norm"]) for entry in report["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A saved tiny model and tokenizer, text files, and the one-process run on the combined batch (4 blocks)."""
    folder = tmp_path_factory.mktemp("ddp")
    tiny_model(vocab_size=99, conv_nonzero=True).save_pretrained(folder / "base")
    make_tiny_tokenizer().save_pretrained(folder / "base")
    files = [str(path) for path in write_text_files(folder / "text", count=3)]
    run([sys.executable, SCRIPT, "--model", "base", "--files", *files, "--batch-size", "4", *TRAIN,
         "--out", "single", "--report", "reports/single"], folder)
    return folder, files


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_keep_tables_identical_and_equal_one_process_on_the_combined_batch(workdir, launcher):
    folder, files = workdir
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(free_port())]
    run([*command, SCRIPT, "--model", "base", "--files", *files, "--batch-size", "2", *TRAIN,
         "--out", launcher, "--report", f"reports/{launcher}"], folder)

    ranks = reports(folder / "reports", launcher)
    (single,) = reports(folder / "reports", "single")
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["sparse"] for r in ranks + [single])
    assert len(ranks[0]["tables"]) == 2
    assert ranks[0]["tables"] == ranks[1]["tables"]  # bit-identical tables on both ranks
    for (loss, norm), (expected_loss, expected_norm) in zip(curve(ranks[0]), curve(single), strict=True):
        assert loss == pytest.approx(expected_loss, abs=1e-5) and norm == pytest.approx(expected_norm, rel=1e-5)
    parallel, alone = load_file(folder / launcher / "model.safetensors"), load_file(folder / "single" / "model.safetensors")
    assert parallel.keys() == alone.keys()
    start = load_file(folder / "base" / "model.safetensors")
    for name, tensor in alone.items():
        torch.testing.assert_close(parallel[name], tensor, atol=2e-6, rtol=1e-5, msg=name)
        if ".engram.table." in name:
            assert not torch.equal(tensor, start[name])
