"""Training across processes on the CPU (gloo, 2 and 3 processes) equals one process on the combined batch: with
replicated tables (DDP, sparse all-reduce), with tables sharded by rows (`--shard-tables`), and with the rest sharded by
FSDP2 beside them (`--fsdp`); and the checkpoints of a sharded run resume on 1, 2 and 3 processes to the
uninterrupted run (torch.distributed.checkpoint). The reference is always the one-process run, never another
distributed run (gloo's AVG under FSDP2 has an open correctness bug, pytorch#162338)."""

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

# One xdist worker runs this module: its module fixtures (the reference runs) then run once.
pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("distributed")]
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
    """torchrun, or accelerate launch with DDP ("accelerate") or with an FSDP2 config ("accelerate-fsdp2")."""
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    mode = ["--use_fsdp", "--fsdp_version", "2"] if launcher == "accelerate-fsdp2" else ["--multi_gpu"]
    return [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]


def assert_same_training(parallel: dict, single: dict) -> None:
    for (loss, norm), (expected_loss, expected_norm) in zip(curve(parallel), curve(single), strict=True):
        assert loss == pytest.approx(expected_loss, abs=1e-5) and norm == pytest.approx(expected_norm, rel=1e-5)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A saved tiny model and tokenizer, text files, and the one-process run on the combined batch (6 blocks).

    The runs that module fixtures make are kept in the worker's base temporary folder and made once: pytest-xdist
    may tear module fixtures down between the tests of a group (when a worker's queue runs short)."""
    folder = tmp_path_factory.getbasetemp() / "distributed"
    files = [str(folder / "text" / f"part{index}.txt") for index in range(3)]
    if not (folder / "reports" / "single.rank0").exists():
        tiny_model(vocab_size=99, conv_nonzero=True).save_pretrained(folder / "base")
        make_tiny_tokenizer().save_pretrained(folder / "base")
        assert [str(path) for path in write_text_files(folder / "text", count=3)] == files
        run([sys.executable, SCRIPT, "--model", "base", "--files", *files, "--batch-size", "6", *TRAIN,
             "--out", "single", "--report", "reports/single"], folder)
    return folder, files


@pytest.mark.slow
def test_two_processes_keep_tables_identical_and_equal_one_process_on_the_combined_batch(workdir):
    """Replicated tables under DDP (accelerate launch; the sharded runs below use torchrun)."""
    folder, files = workdir
    launcher = "accelerate"
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


def sharded_run(folder: Path, files: list[str], launcher: str, processes: int, name: str, *extra: str,
                once: bool = False) -> list[dict]:
    """A run with sharded tables on `processes` with the combined batch of 6; `once`: reuse an earlier run's reports."""
    if once and reports(folder / "reports", name):
        return reports(folder / "reports", name)
    run([*launch(launcher, processes), SCRIPT, "--model", "base", "--files", *files,
         "--batch-size", str(6 // processes), *TRAIN,
         "--shard-tables", "--out", name, "--report", f"reports/{name}", *extra], folder)
    return reports(folder / "reports", name)


@pytest.fixture(scope="module")
def sharded_two(workdir):
    """Two processes with sharded tables (2 x 3 blocks per step, like the one-process run), saving at step 2."""
    folder, files = workdir
    return sharded_run(folder, files, "torchrun", 2, "sharded2", "--save-steps", "2", once=True)


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


def dcp_tensors(checkpoint: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's torch.distributed.checkpoint state (model and optimizer), whole, by key."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    scratch.parent.mkdir(parents=True, exist_ok=True)
    dcp_to_torch_save(checkpoint / "engram_state", scratch)

    def flat(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            elif isinstance(value, torch.Tensor):
                yield f"{prefix}{key}", value

    return dict(flat(torch.load(scratch, weights_only=False)))


@pytest.mark.slow
def test_a_sharded_run_resumes_from_its_checkpoint_to_the_uninterrupted_run(workdir, sharded_two):
    """Tables sharded, the rest under DDP: the checkpoint's DCP state resumes bit for bit on the same processes."""
    folder, files = workdir
    checkpoint = folder / "sharded2" / "checkpoint-2"
    assert (checkpoint / "engram_state" / "engram_run.json").exists() and not list(checkpoint.glob("optimizer-rank*"))
    resumed = sharded_run(folder, files, "torchrun", 2, "resumed2", "--resume", str(checkpoint))
    assert curve(resumed[0]) == curve(sharded_two[0])
    final, uninterrupted = saved_tensors(folder / "resumed2"), saved_tensors(folder / "sharded2")
    assert final.keys() == uninterrupted.keys()
    for key, tensor in uninterrupted.items():
        assert torch.equal(final[key], tensor), key


@pytest.fixture(scope="module")
def fsdp_two(workdir):
    """FSDP2 beside sharded tables on two processes (torchrun), saving at steps 2 and 4."""
    folder, files = workdir
    return sharded_run(folder, files, "torchrun", 2, "fsdp2", "--fsdp", "--save-steps", "2", once=True)


def assert_fsdp(ranks: list[dict], single: dict) -> None:
    """Every rank trained under FSDP2 and held its 1/W of the backbone (torch.chunk's rows of every parameter)."""
    whole, world = single["backbone_bytes"], len(ranks)
    assert all(rank["fsdp"] for rank in ranks) and not single["fsdp"]
    assert sum(rank["backbone_bytes"] for rank in ranks) == whole
    assert all(0.9 * whole / world <= rank["backbone_bytes"] <= 1.1 * whole / world for rank in ranks)


@pytest.mark.slow
def test_fsdp2_beside_sharded_tables_on_two_processes_trains_like_one_process(workdir, fsdp_two):
    folder = workdir[0]
    assert_fsdp(fsdp_two, reports(folder / "reports", "single")[0])
    assert_sharded_equals_single(folder, fsdp_two, "fsdp2", "single")


@pytest.mark.slow
def test_fsdp2_prepared_by_accelerate_on_three_processes_with_activation_checkpointing(workdir, fsdp_two):
    """accelerate launch's FSDP2 config alone turns FSDP2 on (no --fsdp); rows 3 ways uneven; activation
    checkpointing. Through accelerate's own FSDP2 `prepare`, the path of a GPU run (tests/accelerate_fsdp2.py makes
    accelerate's state say FSDP on the CPU): it keeps the model EngramTrainer sharded and remaps the optimizer that
    Trainer built onto it. The checkpoint it writes at step 2 is a resharding one."""
    folder, files = workdir
    script = str(ROOT / "tests" / "accelerate_fsdp2.py")
    run([*launch("accelerate-fsdp2", 3), script, "--model", "base", "--files", *files, "--batch-size", "2", *TRAIN,
         "--shard-tables", "--activation-checkpointing", "--save-steps", "2", "--out", "fsdp3", "--report",
         "reports/fsdp3"], folder)
    ranks = reports(folder / "reports", "fsdp3")
    assert all(rank["fsdp_by_accelerate"] for rank in ranks) and not fsdp_two[0]["fsdp_by_accelerate"]
    assert_fsdp(ranks, reports(folder / "reports", "single")[0])
    assert_sharded_equals_single(folder, ranks, "fsdp3", "single")
    assert (folder / "fsdp3" / "checkpoint-2" / "engram_state" / "engram_run.json").exists()


@pytest.mark.slow
def test_fsdp2_in_bf16_keeps_fp32_weights_and_follows_the_fp32_run(workdir):
    """`--bf16`: FSDP2 computes the backbone in bf16 and reduces its gradients in fp32 (MixedPrecisionPolicy); the
    weights it keeps and saves stay fp32, and the losses follow the fp32 run's to bf16's precision."""
    folder, files = workdir
    ranks = sharded_run(folder, files, "torchrun", 2, "fsdp2-bf16", "--fsdp", "--bf16")
    (single,) = reports(folder / "reports", "single")
    for (loss, _), (expected, _) in zip(curve(ranks[0]), curve(single), strict=True):
        assert loss == pytest.approx(expected, abs=1e-2) and loss != expected
    assert {tensor.dtype for tensor in saved_tensors(folder / "fsdp2-bf16").values() if tensor.is_floating_point()} == {
        torch.float32}


@pytest.mark.slow
@pytest.mark.parametrize("processes, fsdp", [(3, ["--fsdp"]), (1, [])])
def test_an_fsdp2_checkpoint_of_two_processes_resumes_on_three_and_on_one(workdir, fsdp_two, processes, fsdp,
                                                                          tmp_path):
    """Resharded on resume (tables, their Adam moments, FSDP2's shards and theirs), on 3 processes under FSDP2 and on
    1 without it (FSDP's DTensors into plain parameters): the losses, gradient norms, saved model and final
    checkpoint state (every Adam moment) equal the uninterrupted two-process run."""
    folder, files = workdir
    name = f"fsdp2-on-{processes}"
    resumed = sharded_run(folder, files, "torchrun", processes, name, *fsdp, "--save-steps", "2",
                          "--resume", str(folder / "fsdp2" / "checkpoint-2"))
    for rank in resumed:
        assert rank["world_size"] == processes
        assert_same_training(rank, fsdp_two[0])
    final, uninterrupted = saved_tensors(folder / name), saved_tensors(folder / "fsdp2")
    assert final.keys() == uninterrupted.keys()
    for key, tensor in uninterrupted.items():
        torch.testing.assert_close(final[key], tensor, atol=2e-6, rtol=1e-5, msg=key)
    state = dcp_tensors(folder / name / "checkpoint-4", tmp_path / "resumed.pt")
    expected = dcp_tensors(folder / "fsdp2" / "checkpoint-4", tmp_path / "uninterrupted.pt")
    assert state.keys() == expected.keys() and any(".engram.table.weight.exp_avg_sq" in key for key in state)
    for key, tensor in expected.items():
        torch.testing.assert_close(state[key], tensor, atol=2e-6, rtol=1e-5, msg=key)


@pytest.mark.slow
def test_an_fsdp2_checkpoint_resumes_bit_for_bit_on_the_same_processes_and_refuses_another_batch(workdir, fsdp_two,
                                                                                                  tmp_path):
    folder, files = workdir
    checkpoint = str(folder / "fsdp2" / "checkpoint-2")
    resumed = sharded_run(folder, files, "torchrun", 2, "fsdp2-again", "--fsdp", "--save-steps", "2",
                                            "--resume", checkpoint)
    assert curve(resumed[0]) == curve(fsdp_two[0])
    state = dcp_tensors(folder / "fsdp2-again" / "checkpoint-4", tmp_path / "resumed.pt")
    expected = dcp_tensors(folder / "fsdp2" / "checkpoint-4", tmp_path / "uninterrupted.pt")
    assert state.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key
    # 2 processes x 2 sequences x 2 accumulation steps = 8 per step, where the checkpoint trained with 12
    command = [*launch("torchrun", 2), SCRIPT, "--model", "base", "--files", *files, *TRAIN, "--out", "refused",
               "--batch-size", "2", "--shard-tables", "--fsdp", "--resume", checkpoint]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    refused = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0  # every rank refuses, none waits in a collective:
    assert refused.stderr.count("was trained with a global batch of 12 sequences per step (2 ranks); this run's is 8") == 2


@pytest.mark.slow
def test_resuming_checks_the_engram_config_and_the_global_batch_before_reading_any_state(workdir, fsdp_two):
    from modeling_engram.distributed_checkpoint import check_resumable

    checkpoint = str(workdir[0] / "fsdp2" / "checkpoint-2")
    model = tiny_model(vocab_size=99, conv_nonzero=True)
    run = check_resumable(model, checkpoint, 12)  # the model the run started from
    assert (run["world_size"], run["global_batch"]) == (2, 12)
    with pytest.raises(ValueError, match="was trained with a global batch of 12"):
        check_resumable(model, checkpoint, 6)
    assert check_resumable(model, checkpoint, 6, allow_global_batch_change=True)["global_batch"] == 12
    other = tiny_model(vocab_size=99, conv_nonzero=True, engram_seed=7)
    with pytest.raises(ValueError, match=r"another Engram config \(engram_seed, engram_multipliers differ\)"):
        check_resumable(other, checkpoint, 12)
