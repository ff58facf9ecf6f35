"""Row-owner sharded tables on gloo, 2 and 3 processes (uneven blocks), against one process with whole tables:
the lookup and its gradient, loading straight into shards, the streamed standard save, generation, bad input, and
a rank that dies. Training, clipping and resuming under EngramTrainer are in test_distributed.py."""

import multiprocessing
import os
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_model
from transformers import TrainingArguments

from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

from modeling_engram import EngramForCausalLM, shard_engram_model, shard_engram_tables
from modeling_engram.sharded_training import count_exchanged_bytes
from modeling_engram.table_parallel import INDEX_FILE, TABLE_FILE, RowShardedStorage, owner_lookup, row_blocks
from modeling_engram.training import EngramTrainer, create_engram_optimizer, engram_tables

ROWS, WIDTH = 101, 8


def _join(rank: int, world: int, init_file: str, timeout: float = 300) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))


def _lookup_worker(rank: int, world: int, init_file: str, results: dict) -> None:
    _join(rank, world, init_file)
    try:
        torch.manual_seed(0)
        table = torch.randn(ROWS, WIDTH)  # the same whole table on every rank, to cut the shards from
        starts = torch.tensor(row_blocks(ROWS, world))
        shard = torch.nn.Parameter(table[starts[rank] : starts[rank + 1]].clone())
        ids = torch.randint(0, ROWS, (40,), generator=torch.Generator().manual_seed(rank)).unique()
        with count_exchanged_bytes() as small:
            rows = owner_lookup(shard, ids, starts)
        weights = torch.randn(rows.shape, generator=torch.Generator().manual_seed(100 + rank))
        (rows * weights).sum().backward()
        whole = torch.nn.Parameter(table.clone())  # what one process computes for every rank's batch
        for other in range(world):
            other_ids = torch.randint(0, ROWS, (40,), generator=torch.Generator().manual_seed(other)).unique()
            generator = torch.Generator().manual_seed(100 + other)
            other_weights = torch.randn((other_ids.numel(), WIDTH), generator=generator)
            (whole[other_ids] * other_weights).sum().backward()
        # The same ids in a table 10,000 times larger: the exchange does not grow with the table.
        big_starts = torch.tensor(row_blocks(ROWS * 10_000, world))
        big_shard = torch.zeros(int(big_starts[rank + 1] - big_starts[rank]), WIDTH)
        with count_exchanged_bytes() as big:
            owner_lookup(big_shard, ids * 10_000, big_starts)
        results[rank] = {
            "rows_equal": torch.equal(rows, table[ids]),
            "grad_close": torch.allclose(shard.grad.to_dense(), whole.grad[starts[rank] : starts[rank + 1]], atol=1e-6),
            "grad_rows": int(shard.grad.coalesce().indices().numel()),
            "sent": (small["sent"], big["sent"]),
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_owner_lookup_equals_one_whole_table(tmp_path, world=3):
    """Three ranks, uneven blocks (34, 34, 33 rows: torch.chunk's); two ranks are covered by the model and training tests."""
    results = mp.Manager().dict()
    mp.spawn(_lookup_worker, args=(world, str(tmp_path / "init"), results), nprocs=world, join=True)
    assert sorted(results) == list(range(world))
    for rank, result in results.items():
        assert result["rows_equal"], rank
        assert result["grad_close"], rank
        assert 0 < result["grad_rows"] <= ROWS
        small, big = result["sent"]
        assert small == big > 0, rank


def probe_ids(vocab_size: int = 99) -> torch.Tensor:
    return torch.randint(3, vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def mark_rows(model) -> None:
    """Add each row's global index (x 1e-3) to it, so a save that puts a rank's rows at the wrong offset shows."""
    for table in engram_tables(model):
        rows = torch.tensor(table.stored_block, dtype=torch.float32)[:, None] * 1e-3
        table.weight.add_(rows)


def _sharded_model_worker(rank: int, world: int, init_file: str, folder: str, storage: str, results: dict) -> None:
    _join(rank, world, init_file)
    try:
        base = os.path.join(folder, "base")
        whole = EngramForCausalLM.from_pretrained(base).eval()
        model = EngramForCausalLM.from_pretrained(base, engram_table_parallel=True, engram_storage=storage).eval()
        ids = probe_ids()
        with torch.no_grad():
            same_logits = torch.equal(model(ids).logits, whole(ids).logits)
        prompt = dict(input_ids=ids[:, :5], max_new_tokens=8, do_sample=False)
        same_tokens = torch.equal(model.generate(**prompt), whole.generate(**prompt))
        held = [(t.weight.shape[0], len(t.stored_block), t.num_embeddings, t.weight.device.type)
                for t in engram_tables(model)]
        if model.config.engram_row_format is None:
            mark_rows(model)
        model.save_pretrained(os.path.join(folder, "saved"))
        results[rank] = {"same_logits": same_logits, "same_tokens": same_tokens, "held": held}
    finally:
        dist.destroy_process_group()


# Device tables load sharded in every training test (test_distributed.py); here the other two storages.
@pytest.mark.distributed
@pytest.mark.parametrize("world, row_format, storage",
                         [(2, None, "disk"), pytest.param(3, "fp8_e4m3", "host", marks=pytest.mark.slow)])
def test_sharded_load_generate_and_save_equal_one_process(tmp_path, world, row_format, storage):
    """Each rank loads only its rows (disk or host shards, fp32 or FP8), gives the logits and greedy tokens of the
    whole model, and the collective save is a standard checkpoint that one process loads with identical logits."""
    model = tiny_model(conv_nonzero=True, n_embed_per_ngram=64)  # rows 32 wide: one FP8 scale block
    if row_format is not None:
        model.quantize_engram_tables(row_format)
    model.save_pretrained(tmp_path / "base")
    results = mp.Manager().dict()
    mp.spawn(_sharded_model_worker, args=(world, str(tmp_path / "init"), str(tmp_path), storage, results),
             nprocs=world, join=True)
    assert sorted(results) == list(range(world))
    for rank, result in results.items():
        assert result["same_logits"] and result["same_tokens"], rank
        for held, block, rows, device in result["held"]:
            assert held == block < rows and device == "cpu"
    blocks = [[held for held, *_ in results[rank]["held"]] for rank in range(world)]
    assert [sum(column) for column in zip(*blocks)] == [t.num_embeddings for t in engram_tables(model)]

    saved = tmp_path / "saved"
    assert (saved / INDEX_FILE).exists() and (saved / TABLE_FILE).exists() and not (saved / "model.safetensors").exists()
    reloaded = EngramForCausalLM.from_pretrained(saved, attn_implementation="eager").eval()
    if row_format is None:
        mark_rows(model)
    with torch.no_grad():
        assert torch.equal(reloaded(probe_ids()).logits, model(probe_ids()).logits)


def _bad_input_worker(rank: int, world: int, init_file: str, folder: str, results: dict) -> None:
    _join(rank, world, init_file)
    try:
        base = os.path.join(folder, "base")
        errors = {}
        model = EngramForCausalLM.from_pretrained(base)
        if rank == 1:  # a rank that loaded another model
            model.config.engram_seed += 1
            model.model.hasher.token_map[5] = 6
        try:
            shard_engram_tables(model)
        except ValueError as error:
            errors["config"] = str(error)
        ids = probe_ids()
        for name, shard in (("optimizer", shard_engram_tables), ("fsdp optimizer", shard_engram_model)):
            model = EngramForCausalLM.from_pretrained(base)
            optimizer = create_engram_optimizer(model)  # built on the parameters ...
            shard(model)  # ... which sharding replaces: the tables by row shards, the rest by FSDP2's DTensors
            model(ids, labels=ids).loss.backward()
            try:
                optimizer.step()
            except ValueError as error:
                errors[name] = str(error)
            create_engram_optimizer(model).step()  # built after sharding: steps
        trainer = EngramTrainer(model=EngramForCausalLM.from_pretrained(base), shard_tables=True,
                                args=TrainingArguments(os.path.join(folder, "out"), use_cpu=True, report_to=[]))
        tables = engram_tables(trainer.model)
        errors["trainer"] = trainer.sharded and all(isinstance(t.storage, RowShardedStorage) for t in tables)
        resharded = os.path.join(folder, "checkpoint-of-3-ranks")  # a sharded Trainer checkpoint written by 3 ranks
        os.makedirs(resharded, exist_ok=True)
        for other in range(3):
            open(os.path.join(resharded, f"optimizer-rank{other}-of-3.pt"), "wb").close()
        try:
            trainer._load_from_checkpoint(resharded)
        except ValueError as error:
            errors["resume"] = str(error)
        try:  # FSDP2 over whole tables
            fully_shard(EngramForCausalLM.from_pretrained(base))
        except ValueError as error:
            errors["fsdp whole tables"] = str(error)
        # accelerate refuses FSDP1 on CPUs itself, and ignores its other FSDP settings there: the plugins of a GPU run
        whole = EngramTrainer(model=EngramForCausalLM.from_pretrained(base),  # tables not row-sharded
                              args=TrainingArguments(os.path.join(folder, "out"), use_cpu=True, report_to=[]))
        for name, settings in (("fsdp1", dict(fsdp_version=1)), ("offload", dict(cpu_offload=CPUOffloadPolicy())),
                               ("whole tables", {})):
            plugin = dict(fsdp_version=2, activation_checkpointing=False, cpu_offload=None, reshard_after_forward=True)
            try:
                (whole if name == "whole tables" else trainer)._shard_with_fsdp2(SimpleNamespace(**plugin | settings))
            except ValueError as error:
                errors[f"trainer {name}"] = str(error)
        other = EngramForCausalLM.from_pretrained(base)
        if rank == 1:  # a rank that loaded other weights (or none)
            with torch.no_grad():
                other.model.layers[1].mlp.up_proj.weight[0, 0] += 1
        try:
            shard_engram_model(other)
        except ValueError as error:
            errors["other weights"] = str(error)
        meta = EngramForCausalLM.from_pretrained(base).to("meta")
        try:
            shard_engram_model(meta)
        except ValueError as error:
            errors["meta"] = str(error)
        results[rank] = errors
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_ranks_that_disagree_optimizers_built_before_sharding_fsdp_over_tables_and_old_checkpoints_are_clear_errors(
        tmp_path):
    tiny_model().save_pretrained(tmp_path / "base")
    results = mp.Manager().dict()
    mp.spawn(_bad_input_worker, args=(2, str(tmp_path / "init"), str(tmp_path), results), nprocs=2, join=True)
    for rank in range(2):  # every rank raises, so none waits for the other in a later exchange
        assert "rank 1 disagrees with rank 0 on the Engram config (engram_seed, token map)" in results[rank]["config"]
        for built_before in ("optimizer", "fsdp optimizer"):
            assert "this optimizer was built before the model was sharded" in results[rank][built_before]
        assert results[rank]["trainer"] is True  # EngramTrainer(shard_tables=True) shards a whole model
        assert "holds per-rank optimizer files (optimizer-rank*-of-*.pt) of an earlier" in results[rank]["resume"]
        assert "FSDP would shard an Engram table as one dense parameter" in results[rank]["fsdp whole tables"]
        assert "FSDP1 flattens parameters" in results[rank]["trainer fsdp1"]
        assert ("rank 1 holds other weights than rank 0 (model.layers.1.mlp.up_proj.weight, ...)"
                in results[rank]["other weights"])
        assert "CPU offload of the backbone is not supported" in results[rank]["trainer offload"]
        assert "FSDP2 over Engram tables that are not row-sharded" in results[rank]["trainer whole tables"]
        assert "the model has parameters on the meta device" in results[rank]["meta"]


def _fsdp_mhc_worker(rank: int, world: int, init_file: str, results: dict) -> None:
    """Three steps of forward, backward, global clipping and the Engram optimizer on an mHC + MoE model: FSDP2 beside
    sharded tables with each rank on its part of the batch, and (on every rank, alone) the whole model on all of it."""
    from conftest import BACKBONES

    from modeling_engram.sharded_training import clip_grad_norm_

    _join(rank, world, init_file)
    try:
        ids = torch.randint(3, 97, (4, 12), generator=torch.Generator().manual_seed(1))
        for sharded in (False, True):
            torch.manual_seed(0)
            model = tiny_model(vocab_size=99, **BACKBONES["hc4-moe"])
            if sharded:
                shard_engram_model(model)
            optimizer = create_engram_optimizer(model, lr=1e-2)
            batch = ids.chunk(world)[rank] if sharded else ids
            norms = []
            for _ in range(3):
                model(batch, labels=batch).loss.backward()
                norm = clip_grad_norm_(model, 0.5) if sharded else torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                norms.append(norm.item())
                optimizer.step()
                optimizer.zero_grad()
            with torch.no_grad():
                results[(rank, sharded)] = (norms, model(ids, labels=ids).loss.item())
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_on_an_mhc_and_moe_backbone_trains_like_one_process(tmp_path):
    """Blocks that take and return [B, T, hc_mult, hidden] and MoE routers with balancing biases, under FSDP2."""
    results = mp.Manager().dict()
    mp.spawn(_fsdp_mhc_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    for rank in range(2):
        (norms, loss), (expected_norms, expected_loss) = results[(rank, True)], results[(rank, False)]
        assert norms == pytest.approx(expected_norms, rel=1e-5) and loss == pytest.approx(expected_loss, abs=1e-5)


def _dying_worker(rank: int, world: int, init_file: str, folder: str, results: dict) -> None:
    _join(rank, world, init_file, timeout=120)
    model = EngramForCausalLM.from_pretrained(os.path.join(folder, "base"), engram_table_parallel=True)
    ids = probe_ids()
    with torch.no_grad():
        model(ids)  # one forward together
        if rank == 1:
            os._exit(3)  # dies mid-run, without a word to the others
        start = time.monotonic()
        try:
            for _ in range(50):
                model(ids)
            results[rank] = ("no error", time.monotonic() - start)
        except Exception as error:  # noqa: BLE001 - whatever the backend raises, it must raise
            results[rank] = (f"{type(error).__name__}: {error}", time.monotonic() - start)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_rank_that_dies_makes_the_others_fail_instead_of_hanging(tmp_path):
    tiny_model().save_pretrained(tmp_path / "base")
    results = mp.Manager().dict()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_dying_worker, args=(rank, 2, str(tmp_path / "init"), str(tmp_path), results))
               for rank in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=200)
    alive = [worker.pid for worker in workers if worker.is_alive()]
    for worker in workers:
        worker.kill()
    assert not alive, "a rank hung after its peer died"
    assert workers[1].exitcode == 3
    message, seconds = results[0]
    assert message != "no error" and seconds < 150, (message, seconds)


def test_row_blocks_are_torch_chunk_blocks_and_refuse_a_rank_without_rows():
    """DTensor's Shard(0) cuts torch.chunk's blocks: the resharding checkpoints (test_fsdp.py) rely on it."""
    for rows, world in [(10, 3), (101, 3), (31, 2), (1000, 7), (8, 4)]:
        starts = row_blocks(rows, world)
        assert [len(chunk) for chunk in torch.arange(rows).chunk(world)] == [b - a for a, b in zip(starts, starts[1:])]
    assert row_blocks(10, 3) == [0, 4, 8, 10]
    with pytest.raises(ValueError, match="a table of 2 rows cannot be sharded over 3 ranks"):
        row_blocks(2, 3)
    with pytest.raises(ValueError, match="blocks of 2 rows .* leave rank 3 without a row"):
        row_blocks(5, 4)  # more rows than ranks, but torch.chunk's blocks of 2 use up the rows on three of them


def test_sharding_needs_a_process_group(tmp_path):
    assert not dist.is_initialized()  # the test process never joins one: only the spawned workers do
    with pytest.raises(RuntimeError, match="initialise a process group first"):
        owner_lookup(torch.nn.Parameter(torch.zeros(3, 2)), torch.tensor([0]), torch.tensor([0, 3]))
    model = tiny_model()
    with pytest.raises(RuntimeError, match="initialise a process group first"):
        shard_engram_tables(model)
    model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="initialise a process group first"):
        EngramForCausalLM.from_pretrained(tmp_path, engram_table_parallel=True)
