"""Where an Engram table's rows live, behind one protocol: one class per placement, and a hot-row cache in front.

A storage moves rows; it owns no parameter. The table (`memory.EngramTable`) keeps `weight` [stored rows, head_dim]
and the row format, and a storage reads that weight through `table.compact_rows` (the bytes a gather moves: packed
FP8 value and scale bytes, or the stored rows). The protocol (`RowReader`):

- `read_unique(table, unique [U]) -> rows [U, row width]`: the rows of sorted unique global row ids, on the ids'
  device (or `(rows, cuda event)` when a side stream copied them); only these rows are read and moved;
- `prefetch(table, unique)`: the same read started early, in the background (a `Future`).

A placement (`TableStorage`) adds `block`, the rows of the whole table this process stores (all of them, or one
rank's block), and how its rows are held. `DeviceStorage`, `HostStorage` and `DiskStorage` are the `engram_storage`
placements; `table_parallel.RowShardedStorage` splits a table's rows over ranks, each rank's block held in one of
those three. `HotRowCache` reads through a placement.
"""

import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

_executors: dict[str, ThreadPoolExecutor] = {}
_executor_lock = threading.Lock()
DISK_READ_CHUNKS = 8  # concurrent page-fault readers per disk gather: SSDs serve random reads best at depth > 1


def _executor(name: str, workers: int) -> ThreadPoolExecutor:
    with _executor_lock:
        if name not in _executors:
            _executors[name] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    return _executors[name]


class FileMapping:
    """A private (copy-on-write) memory map of one tensor of a safetensors file; pages are read when touched."""

    def __init__(self, path: str, entry: tuple[torch.dtype, list[int], int, int]):
        import numpy as np

        dtype, shape, self.start, self.end = entry
        self.path = path
        with open(path, "rb") as handle:
            self.mmap = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        self.mmap.madvise(mmap.MADV_RANDOM)  # row gathers are random: no readahead around each faulted page
        pages = np.frombuffer(self.mmap, dtype=np.uint8, count=self.end - self.start, offset=self.start)
        self.tensor = torch.from_numpy(pages).view(dtype).view(shape)

    def release_pages(self) -> None:
        """Drop the mapped pages from this process and the file from the page cache (cold reads next time)."""
        start = self.start - self.start % mmap.PAGESIZE
        self.mmap.madvise(mmap.MADV_DONTNEED, start, self.end - start)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # dirty pages (a freshly saved file) cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class RowReader:
    """The read protocol: `read_unique`, and `prefetch`, the same read started early."""

    def read_unique(self, table, unique: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.cuda.Event]:
        """Compact rows [U, row width] of the sorted unique global row ids `unique` [U], on `unique`'s device."""
        raise NotImplementedError

    def prefetch(self, table, unique: torch.Tensor) -> Future:
        """`read_unique` started on a background thread; the rows move while the layers before the table's run."""
        grad_enabled = torch.is_grad_enabled()  # thread-local: the read must record autograd as its caller would
        return _executor("engram-prefetch", 4).submit(self._read_unique_with_grad, table, unique, grad_enabled)

    def _read_unique_with_grad(self, table, unique: torch.Tensor, grad_enabled: bool):
        with torch.set_grad_enabled(grad_enabled):
            return self.read_unique(table, unique)


class TableStorage(RowReader):
    """A placement: where a table's rows live (`block` of them), how they are read, and how they are held.

    `empty` allocates rows there, `hold` takes a checkpoint tensor's rows from its memory map, `own` takes a block
    of rows when a table is sharded.
    """

    name: str  # the `engram_storage` value
    block = slice(None)  # rows of the whole table this process stores
    follows_model = False  # whether `model.to(device)` moves the rows (a dtype change only without a row format)
    prefetches = True  # whether a model starts this table's fetch at its entry, overlapped with the layers before
    read_only = False  # the rows cannot change (no training, no `convert_rows`)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Uninitialised rows where this storage keeps them (`device`: the model's)."""
        raise NotImplementedError

    def own(self, rows: torch.Tensor) -> torch.Tensor:
        """This storage's own copy of `rows` [R, ...], so that the tensor they were cut from can be released."""
        return self.empty(rows.shape, rows.dtype, rows.device).copy_(rows)

    def hold(self, mapping: FileMapping, block: slice, device: torch.device) -> torch.Tensor:
        """Rows `block` of a checkpoint tensor (`mapping`), held where this storage keeps rows."""
        rows = mapping.tensor[block]
        return self.empty(rows.shape, rows.dtype, device).copy_(rows)

    def gather(self, table, ids: torch.Tensor) -> torch.Tensor:
        """Compact rows `ids` [U] (ids on the rows' device), read where the rows live."""
        return table.compact_rows(ids)

    def read_unique(self, table, unique):
        return self.gather(table, unique.to(table.weight.device)).to(unique.device)

    def __repr__(self) -> str:
        return self.name


class DeviceStorage(TableStorage):
    """Rows on the execution device, an ordinary parameter: read in place (the table may skip `read_unique`)."""

    name = "device"
    follows_model = True
    prefetches = False  # nothing to move

    def empty(self, shape, dtype, device):
        return torch.empty(shape, dtype=dtype, device=device)


class HostStorage(TableStorage):
    """Rows in CPU memory, pinned when CUDA is present; the unique rows are copied to a GPU on a side stream."""

    name = "host"

    def __init__(self):
        self._copy_stream: torch.cuda.Stream | None = None

    def empty(self, shape, dtype, device):
        return torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())

    def read_unique(self, table, unique):
        device = unique.device
        rows = self.gather(table, unique.to(table.weight.device))
        if device.type != "cuda" or rows.device == device or rows.requires_grad:
            return rows.to(device)  # trainable rows are copied synchronously, so autograd sees the copy
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device)
        with torch.cuda.stream(self._copy_stream):
            staged = rows.pin_memory() if not rows.is_pinned() else rows
            moved = staged.to(device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        return moved, event


class DiskStorage(HostStorage):
    """Rows memory-mapped from the checkpoint's safetensors (read-only): pages are read when a gather touches them,
    from several threads at once."""

    name = "disk"
    read_only = True

    def __init__(self):
        super().__init__()
        self.mappings: list[FileMapping] = []  # the memory maps behind the table's tensors

    def own(self, rows):
        return rows  # a view of the memory map: only these rows' pages are ever read

    def hold(self, mapping, block, device):
        self.mappings.append(mapping)
        return mapping.tensor[block]

    def gather(self, table, ids):
        if ids.numel() < 1024:
            return table.compact_rows(ids)
        readers = _executor("engram-disk-read", DISK_READ_CHUNKS)
        parts = [readers.submit(table.compact_rows, part) for part in ids.chunk(DISK_READ_CHUNKS)]
        return torch.cat([part.result() for part in parts])

    def release_pages(self) -> None:
        """Drop the table's pages from memory and from the page cache: the next gathers read the disk."""
        for mapping in self.mappings:
            mapping.release_pages()


STORAGES = {storage.name: storage for storage in (DeviceStorage, HostStorage, DiskStorage)}


class HotRowCache(RowReader):
    """A bounded cache of the most frequently fetched rows of one table, on the execution device, in front of the
    table's `storage`.

    It counts every row fetch (4 bytes per row, where the rows live); every `refresh_every` fetches the `capacity`
    most frequent rows are (re)loaded. Lookups use a sorted id list and `searchsorted`; misses are read from
    `storage`. Rows that train (grad enabled, trainable weight) are always read from `storage`, never served stale,
    and not counted.
    """

    def __init__(self, storage: TableStorage, capacity: int, refresh_every: int = 8):
        self.storage = storage
        self.capacity = capacity
        self.refresh_every = refresh_every
        self.counts: torch.Tensor | None = None
        self.ids: torch.Tensor | None = None  # sorted global row ids [K], execution device
        self.rows: torch.Tensor | None = None  # [K, compact row] as gathers move them (`pack_rows`), execution device
        self.fetches = 0
        self.lookups = 0
        self.hits = 0

    def stats(self) -> dict[str, float]:
        """Unique rows looked up, how many the cache served, and the hit rate."""
        return {"lookups": self.lookups, "hits": self.hits, "hit_rate": self.hits / max(1, self.lookups)}

    def reset_stats(self) -> None:
        self.lookups = self.hits = 0

    def clear(self) -> None:
        """Drop cached rows (e.g. after the table was updated); counts are kept."""
        self.ids = self.rows = None

    def read_unique(self, table, unique):
        if torch.is_grad_enabled() and table.weight.requires_grad:
            return self.storage.read_unique(table, unique)
        hit, slot = self._lookup(unique)
        read = self.storage.read_unique(table, unique[~hit])
        if isinstance(read, tuple):
            torch.cuda.current_stream(unique.device).wait_event(read[1])
            read = read[0]
        rows = read.new_empty(unique.shape[0], read.shape[1])
        rows[~hit] = read
        if self.rows is not None:
            rows[hit] = self.rows[slot[hit]]
        self.lookups += unique.numel()
        self.hits += int(hit.sum())
        self._record(table, unique)
        return rows

    def _lookup(self, unique: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hit mask, cache slot) for sorted unique ids on the execution device."""
        if self.ids is None:
            return torch.zeros_like(unique, dtype=torch.bool), torch.zeros_like(unique)
        slot = torch.searchsorted(self.ids, unique).clamp_(max=self.ids.numel() - 1)
        return self.ids[slot] == unique, slot

    @torch.no_grad()
    def _record(self, table, unique: torch.Tensor) -> None:
        stored = unique.to(table.weight.device)
        if self.counts is None:
            self.counts = torch.zeros(table.num_embeddings, dtype=torch.int32, device=stored.device)
        self.counts.index_add_(0, stored, torch.ones_like(stored, dtype=torch.int32))
        self.fetches += 1
        if self.fetches % self.refresh_every == 0:
            k = min(self.capacity, int(torch.count_nonzero(self.counts)))
            if k:
                top = torch.topk(self.counts, k, sorted=False).indices.sort().values
                self.rows = self.storage.gather(table, top).to(unique.device)
                self.ids = top.to(unique.device)


__all__ = [
    "DeviceStorage", "DiskStorage", "FileMapping", "HostStorage", "HotRowCache", "RowReader", "STORAGES",
    "TableStorage",
]
