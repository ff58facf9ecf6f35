"""Data-parallel training on the CPU (gloo, 2 and 3 processes) equals one process on the combined batch: with
replicated tables (sparse all-reduce) and with tables sharded by rows (`--shard-tables`), including a sharded
Trainer checkpoint that resumes to the uninterrupted run (resuming on another rank count: test_table_parallel.py)."""

import glob
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_tokenizer, require, tiny_model, write_text_files
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed
require("datasets")  # examples/train.py reads its text through it
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "examples" / "train.py")
# Every run steps on 6 blocks (one process x 6, two x 3, three x 2) x 2 accumulation steps; the clipping threshold
# (0.5) is below the gradient norms (~1).
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


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model folder, whether it is one file or an index of several."""
    return {name: tensor for path in sorted(glob.glob(str(folder / "*.safetensors")))
            for name, tensor in load_file(path).items()}


def launch(launcher: str, processes: int) -> list[str]:
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]


def assert_same_training(parallel: dict, single: dict) -> None:
    for (loss, norm), (expected_loss, expected_norm) in zip(curve(parallel), curve(single), strict=True):
        assert loss == pytest.approx(expected_loss, abs=1e-5) and norm == pytest.approx(expected_norm, rel=1e-5)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A saved tiny model and tokenizer, text files, and the one-process run on the combined batch (6 blocks)."""
    folder = tmp_path_factory.mktemp("ddp")
    tiny_model(vocab_size=99, conv_nonzero=True).save_pretrained(folder / "base")
    make_tiny_tokenizer().save_pretrained(folder / "base")
    files = [str(path) for path in write_text_files(folder / "text", count=3)]
    run([sys.executable, SCRIPT, "--model", "base", "--files", *files, "--batch-size", "6", *TRAIN,
         "--out", "single", "--report", "reports/single"], folder)
    return folder, files


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_keep_tables_identical_and_equal_one_process_on_the_combined_batch(workdir, launcher):
    folder, files = workdir
    run([*launch(launcher, 2), SCRIPT, "--model", "base", "--files", *files, "--batch-size", "3", *TRAIN,
         "--out", launcher, "--report", f"reports/{launcher}"], folder)

    ranks = reports(folder / "reports", launcher)
    (single,) = reports(folder / "reports", "single")
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["sparse"] for r in ranks + [single])
    assert len(ranks[0]["tables"]) == 2
    assert ranks[0]["tables"] == ranks[1]["tables"]  # bit-identical tables on both ranks
    assert_same_training(ranks[0], single)
    parallel, alone = load_file(folder / launcher / "model.safetensors"), load_file(folder / "single" / "model.safetensors")
    assert parallel.keys() == alone.keys()
    start = load_file(folder / "base" / "model.safetensors")
    for name, tensor in alone.items():
        torch.testing.assert_close(parallel[name], tensor, atol=2e-6, rtol=1e-5, msg=name)
        if ".engram.table." in name:
            assert not torch.equal(tensor, start[name])


def sharded_run(folder: Path, files: list[str], launcher: str, processes: int, name: str, *extra: str) -> list[dict]:
    run([*launch(launcher, processes), SCRIPT, "--model", "base", "--files", *files,
         "--batch-size", str(6 // processes), *TRAIN,
         "--shard-tables", "--out", name, "--report", f"reports/{name}", *extra], folder)
    return reports(folder / "reports", name)


@pytest.fixture(scope="module")
def sharded_two(workdir):
    """Two processes with sharded tables (2 x 3 blocks per step, like the one-process run), saving at step 2."""
    folder, files = workdir
    return sharded_run(folder, files, "torchrun", 2, "sharded2", "--save-steps", "2")


def assert_sharded_equals_single(folder: Path, ranks: list[dict], name: str, single: str) -> None:
    (alone,) = reports(folder / "reports", single)
    whole = alone["table_bytes"]
    assert [r["world_size"] for r in ranks] == [len(ranks)] * len(ranks)
    assert sum(r["table_bytes"] for r in ranks) == whole and all(r["table_bytes"] < whole for r in ranks)
    for rank in ranks:
        assert_same_training(rank, alone)
    saved, expected = saved_tensors(folder / name), load_file(folder / single / "model.safetensors")
    assert not (folder / name / "model.safetensors").exists()  # the tables went to their own file of the index
    assert saved.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(saved[key], tensor, atol=2e-6, rtol=1e-5, msg=key)


@pytest.mark.slow
def test_sharded_tables_on_two_processes_train_like_one_process(workdir, sharded_two):
    assert_sharded_equals_single(workdir[0], sharded_two, "sharded2", "single")


@pytest.mark.slow
def test_sharded_tables_on_three_processes_train_like_one_process(workdir):
    """An uneven split (the tables' rows are not multiples of 3), under accelerate launch."""
    folder, files = workdir
    ranks = sharded_run(folder, files, "accelerate", 3, "sharded3")
    assert_sharded_equals_single(folder, ranks, "sharded3", "single")


@pytest.mark.slow
def test_a_sharded_run_resumes_from_its_checkpoint_to_the_uninterrupted_run(workdir, sharded_two):
    folder, files = workdir
    checkpoint = folder / "sharded2" / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.glob("optimizer-*")) == ["optimizer-rank0-of-2.pt", "optimizer-rank1-of-2.pt"]
    resumed = sharded_run(folder, files, "torchrun", 2, "resumed2", "--resume", str(checkpoint))
    assert curve(resumed[0]) == curve(sharded_two[0])
    final, uninterrupted = saved_tensors(folder / "resumed2"), saved_tensors(folder / "sharded2")
    assert final.keys() == uninterrupted.keys()
    for key, tensor in uninterrupted.items():
        assert torch.equal(final[key], tensor), key
