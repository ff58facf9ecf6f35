"""The storage protocol (storage.py): every placement reads the same rows, the hot-row cache reads through a
storage and keeps its own counts, and a table is told its placement when it is built."""

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_config
from safetensors.torch import save_file

from modeling_engram import EngramForCausalLM
from modeling_engram.memory import EngramTable, RowFetch, rows_from_checkpoint, safetensors_index
from modeling_engram.storage import DeviceStorage, DiskStorage, FileMapping, HostStorage, HotRowCache
from modeling_engram.table_parallel import RowShardedStorage, row_blocks

SIZES, WIDTH = [601, 607, 613], 32  # rows 32 wide: one FP8 scale block
CPU = torch.device("cpu")


def reference_table(row_format: str) -> EngramTable:
    torch.manual_seed(0)
    table = EngramTable(SIZES, WIDTH, row_format=row_format)
    if table.scaled:
        table.init_fp8_rows(0.02)
    else:
        torch.nn.init.normal_(table.weight)
    return table


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def table_from_checkpoint(reference: EngramTable, folder, storage: str, starts=None, rank=0, group=None) -> EngramTable:
    """A table in `storage` whose rows come from a safetensors file of `reference`, as from_pretrained reads them;
    with `starts`, sharded first (`engram_table_parallel=True`), so that only rank `rank`'s block is read."""
    path = str(folder / "table.safetensors")
    tensors = {"weight": reference.weight.detach()}
    if reference.weight_scale is not None:
        tensors["weight_scale"] = reference.weight_scale
    save_file(tensors, path)
    index = safetensors_index(path)
    table = EngramTable(SIZES, WIDTH, storage=storage, row_format=reference.format.name, from_checkpoint=True)
    if starts is not None:
        table.keep_rows(RowShardedStorage(table.storage, starts, rank, group))
    maps = [FileMapping(path, index[key]) for key in tensors]
    table.attach(*(table.storage.hold(mapping, table.storage.block, CPU) for mapping in maps))
    return table


@torch.no_grad()  # inference: the cache serves rows only to reads that do not train them
@pytest.mark.parametrize("row_format", ["fp32", "fp8_e4m3"])
@pytest.mark.parametrize("placement", ["device", "host", "disk", "row-sharded", "host + cache"])
def test_every_placement_reads_the_same_rows_through_the_protocol(tmp_path, request, row_format, placement):
    reference = reference_table(row_format)
    if placement == "row-sharded":
        table = table_from_checkpoint(reference, tmp_path, "host", row_blocks(sum(SIZES), 1), 0,
                                      request.getfixturevalue("one_rank_group"))
    else:
        table = table_from_checkpoint(reference, tmp_path, placement.removesuffix(" + cache"))
    expected_class = {"device": DeviceStorage, "host": HostStorage, "disk": DiskStorage,
                      "row-sharded": RowShardedStorage, "host + cache": HostStorage}[placement]
    assert type(table.storage) is expected_class
    reader = HotRowCache(table.storage, capacity=8, refresh_every=1) if "cache" in placement else table.storage
    # more ids than a disk gather reads in one thread
    unique = torch.randperm(table.num_embeddings, generator=torch.Generator().manual_seed(1))[:1200].sort().values
    expected = reference.compact_rows(unique)
    for _ in range(3):  # the cache serves some rows from the second read on
        rows = reader.read_unique(table, unique)
        assert rows.shape == expected.shape  # the unique rows only, as gathers move them
        assert torch.equal(RowFetch(rows).wait(), expected.flatten(-2))
        assert torch.equal(RowFetch(reader.prefetch(table, unique)).wait(), expected.flatten(-2))
    if placement == "disk":  # the storage keeps its memory maps (`release_pages`)
        assert {m.path for m in table.storage.mappings} == {str(tmp_path / "table.safetensors")}
    if "cache" in placement:
        assert reader.hits > 0


class RecordingStorage(HostStorage):
    """Host storage that records which ids it was asked for."""

    def __init__(self):
        super().__init__()
        self.asked = []

    def read_unique(self, table, unique):
        self.asked.append(unique.tolist())
        return super().read_unique(table, unique)


@torch.no_grad()
def test_the_cache_reads_misses_through_its_storage_and_keeps_its_own_counts():
    table = reference_table("fp32")
    storage = RecordingStorage()
    cache = HotRowCache(storage, capacity=3, refresh_every=2)
    hot, cold = torch.tensor([4, 9, 30]), torch.tensor([1, 2])
    for step in range(4):
        ids = torch.cat([hot, cold + 10 * step]).sort().values  # the hot rows every time, other rows once each
        assert torch.equal(cache.read_unique(table, ids), table.compact_rows(ids))
    # Refreshed after the 2nd read: the 3rd and 4th ask the storage for the cold rows alone.
    assert storage.asked[2:] == [[21, 22], [31, 32]]
    assert cache.stats() == {"lookups": 20, "hits": 6, "hit_rate": 0.3}
    table.weight.requires_grad_(True)
    with torch.enable_grad():  # training: every row from the storage, nothing counted
        cache.read_unique(table, hot)
    assert storage.asked[-1] == [4, 9, 30] and cache.stats()["lookups"] == 20


def test_a_table_is_told_its_placement():
    assert EngramTable(SIZES, WIDTH, storage="host").weight.shape == (sum(SIZES), WIDTH)
    assert EngramTable(SIZES, WIDTH, storage="host", from_checkpoint=True).weight is None
    assert [rows_from_checkpoint(storage, loading) for loading in (None, "whole", "sharded")
            for storage in ("device", "host")] == [False, False, False, True, True, True]
    for storage, loading, empty in [("host", None, False), ("host", "whole", True), ("device", "whole", False),
                                    ("device", "sharded", True)]:
        with torch.device("meta"):
            model = EngramForCausalLM(tiny_config(engram_storage=storage), engram_loading=loading)
        tables = [m for m in model.modules() if isinstance(m, EngramTable)]
        assert [t.weight is None for t in tables] == [empty] * len(tables), (storage, loading)


@pytest.mark.parametrize("storage", ["device", "host", "disk"])
@pytest.mark.parametrize("when", ["after loading", "while loading"])
def test_sharding_keeps_a_block_where_the_storage_keeps_rows(tmp_path, storage, when):
    """No process group is needed to cut a table: rank 1 of the blocks [0, 40, 1821) keeps rows 40..1820, cut from
    a whole table (`shard_engram_tables`) or read alone from the checkpoint (`engram_table_parallel=True`)."""
    reference = reference_table("fp8_e4m3")
    values, scales = reference.weight.detach()[40:].clone(), reference.weight_scale[40:].clone()
    if when == "while loading":
        table = table_from_checkpoint(reference, tmp_path, storage, starts=[0, 40, 1821], rank=1)
    else:
        table = table_from_checkpoint(reference, tmp_path, storage) if storage == "disk" else reference
        whole = table.weight
        table.keep_rows(RowShardedStorage(table.storage, [0, 40, 1821], 1, group=None))
        assert whole._engram_sharded_away and whole.numel() == 0  # the whole table is released at once
    assert table.stored_block == range(40, 1821) and "shard=rows 40..1820 of 1821 (rank 1 of 2)" in repr(table)
    assert torch.equal(table.weight.view(torch.uint8), values.view(torch.uint8))
    assert torch.equal(table.weight_scale, scales)
    if storage == "disk":  # a view of its memory map: only the block's pages are ever read
        assert table.weight.data_ptr() == table.storage.local.mappings[0].tensor.data_ptr() + 40 * WIDTH
    else:  # a copy of the block alone
        assert table.weight.untyped_storage().nbytes() == 1781 * WIDTH
