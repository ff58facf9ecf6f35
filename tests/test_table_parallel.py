"""Row-owner sharded table lookup on gloo, 2 and 3 processes (uneven blocks), against one whole table."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from modeling_engram.table_parallel import owner_lookup, row_blocks

ROWS, WIDTH = 101, 8


def _worker(rank: int, world: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        table = torch.randn(ROWS, WIDTH)  # the same whole table on every rank, to cut the shards from
        starts = torch.tensor(row_blocks(ROWS, world))
        shard = torch.nn.Parameter(table[starts[rank] : starts[rank + 1]].clone())
        ids = torch.randint(0, ROWS, (40,), generator=torch.Generator().manual_seed(rank)).unique()
        rows = owner_lookup(shard, ids, starts)
        weights = torch.randn(rows.shape, generator=torch.Generator().manual_seed(100 + rank))
        (rows * weights).sum().backward()
        whole = torch.nn.Parameter(table.clone())  # what one process computes for every rank's batch
        for other in range(world):
            other_ids = torch.randint(0, ROWS, (40,), generator=torch.Generator().manual_seed(other)).unique()
            generator = torch.Generator().manual_seed(100 + other)
            other_weights = torch.randn((other_ids.numel(), WIDTH), generator=generator)
            (whole[other_ids] * other_weights).sum().backward()
        results[rank] = {
            "rows_equal": torch.equal(rows, table[ids]),
            "grad_close": torch.allclose(shard.grad.to_dense(), whole.grad[starts[rank] : starts[rank + 1]], atol=1e-6),
            "grad_rows": int(shard.grad.coalesce().indices().numel()),
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_owner_lookup_equals_one_whole_table(tmp_path, world):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), results), nprocs=world, join=True)
    assert sorted(results) == list(range(world))
    for rank, result in results.items():
        assert result["rows_equal"], rank
        assert result["grad_close"], rank
        assert 0 < result["grad_rows"] <= ROWS


def test_row_blocks_split_unevenly_and_refuse_too_few_rows():
    assert row_blocks(10, 3) == [0, 4, 7, 10]
    with pytest.raises(ValueError, match="a table of 2 rows cannot be sharded over 3 ranks"):
        row_blocks(2, 3)


def test_owner_lookup_needs_a_process_group():
    assert not dist.is_initialized()  # the test process never joins one: only the spawned workers do
    with pytest.raises(RuntimeError, match="initialise a process group first"):
        owner_lookup(torch.nn.Parameter(torch.zeros(3, 2)), torch.tensor([0]), torch.tensor([0, 3]))

