"""Engram memory tables: storage (device | host | disk), row gather, asynchronous prefetch and a hot-row cache.

All heads of all orders of one layer live in one flat table with per-head row offsets. Whatever the storage,
only the rows a batch gathers ever move between devices: ids are deduplicated on the execution device, the unique
rows are read where the table lives and only they are copied over.
"""

import contextvars
import json
import mmap
import os
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn
from torch.nn import functional as F

from .kernel_dispatch import checked_preference, load_kernels, use_triton

# Set by `EngramPreTrainedModel.from_pretrained`: host/disk tables are then read from the checkpoint files by
# `attach_checkpoint_tables`, never by transformers' loader (which would materialise them whole).
EXTERNAL_TABLES = contextvars.ContextVar("engram_external_tables", default=False)

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_executors: dict[str, ThreadPoolExecutor] = {}
_executor_lock = threading.Lock()
DISK_READ_CHUNKS = 8  # concurrent page-fault readers per disk gather: SSDs serve random reads best at depth > 1


def _executor(name: str, workers: int) -> ThreadPoolExecutor:
    with _executor_lock:
        if name not in _executors:
            _executors[name] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    return _executors[name]


def safetensors_index(path: str) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """`{name: (dtype, shape, byte_start, byte_end)}` of a .safetensors file, read from its header only."""
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    base = 8 + header_len
    return {
        name: (_SAFETENSORS_DTYPES[info["dtype"]], info["shape"], base + info["data_offsets"][0],
               base + info["data_offsets"][1])
        for name, info in header.items()
        if name != "__metadata__"
    }


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


class HotRowCache:
    """A bounded cache of the most frequently fetched rows of one table, on the execution device.

    Row fetch counts are kept on the storage side (4 bytes per row); every `refresh_every` fetches the
    `capacity` most frequent rows are (re)loaded. Lookups use a sorted id list and `searchsorted`.
    """

    def __init__(self, capacity: int, refresh_every: int = 8):
        self.capacity = capacity
        self.refresh_every = refresh_every
        self.counts: torch.Tensor | None = None
        self.ids: torch.Tensor | None = None  # sorted global row ids [K], execution device
        self.rows: torch.Tensor | None = None  # [K, head_dim], execution device
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

    def lookup(self, unique: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hit mask, cache slot) for sorted unique ids on the execution device."""
        if self.ids is None:
            return torch.zeros_like(unique, dtype=torch.bool), torch.zeros_like(unique)
        slot = torch.searchsorted(self.ids, unique).clamp_(max=self.ids.numel() - 1)
        return self.ids[slot] == unique, slot

    def record(self, unique_on_storage: torch.Tensor, weight: torch.Tensor, device: torch.device) -> None:
        if self.counts is None:
            self.counts = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)
        self.counts.index_add_(0, unique_on_storage, torch.ones_like(unique_on_storage, dtype=torch.int32))
        self.fetches += 1
        if self.fetches % self.refresh_every == 0:
            self.refresh(weight, device)

    @torch.no_grad()
    def refresh(self, weight: torch.Tensor, device: torch.device) -> None:
        k = min(self.capacity, int(torch.count_nonzero(self.counts)))
        if k == 0:
            return
        top = torch.topk(self.counts, k, sorted=False).indices.sort().values
        self.rows = F.embedding(top, weight).to(device)
        self.ids = top.to(device)


class RowFetch:
    """A started row gather: `wait()` returns the rows [B, T, heads * head_dim] on the execution device."""

    def __init__(self, result: torch.Tensor | Future, inverse: torch.Tensor | None = None):
        self._result = result
        self._inverse = inverse

    def wait(self) -> torch.Tensor:
        rows = self._result.result() if isinstance(self._result, Future) else self._result
        if isinstance(rows, tuple):  # (rows, cuda event) from a side-stream copy
            rows, event = rows
            torch.cuda.current_stream(rows.device).wait_event(event)
            rows.record_stream(torch.cuda.current_stream(rows.device))
        if self._inverse is not None:
            rows = rows[self._inverse]
        return rows.flatten(-2)


class EngramTable(nn.Embedding):
    """One layer's flat table `weight` [sum of head table sizes, head_dim], stored per `storage`.

    `forward(hash_ids [B, T, heads]) -> rows [B, T, heads * head_dim]`: head j reads row
    `offsets[j] + hash_ids[..., j]`. `fetch(hash_ids, asynchronous=True)` starts the same gather in the
    background and returns a `RowFetch`. Host and disk tables stay where they are when the model moves
    (`model.to("cuda")` moves everything else), and keep their stored dtype.

    An `nn.Embedding` for its `sparse` flag (off by default): `training.py` turns it on, and the weight then gets
    sparse gradients over the gathered rows only, which DistributedDataParallel (it recognises embeddings by type)
    all-reduces sparsely.
    """

    def __init__(
        self, table_sizes: list[int], head_dim: int, storage: str = "device", cache_rows: int = 0, kernel: str = "auto"
    ):
        external = storage != "device" and EXTERNAL_TABLES.get()
        rows = sum(table_sizes)  # the weight is filled by `_init_weights` or a checkpoint; never by nn.Embedding
        super().__init__(rows, head_dim, _weight=torch.empty(rows, head_dim, device="meta" if external else None))
        self.kernel = checked_preference(kernel)  # engram_kernel preference for the device-table gather
        self.table_sizes = list(table_sizes)
        self.head_dim = head_dim
        self.storage = storage
        self.cache = HotRowCache(cache_rows) if cache_rows > 0 else None
        self.mapping: FileMapping | None = None  # disk storage: the memory map behind `weight`
        self._copy_stream = None
        if external:
            self.register_parameter("weight", None)  # read from the checkpoint by `attach_checkpoint_tables`
        self.offsets = nn.Buffer(self.head_offsets(), persistent=False)

    def head_offsets(self) -> torch.Tensor:
        sizes = torch.tensor(self.table_sizes, dtype=torch.long)
        return torch.cumsum(sizes, 0) - sizes

    def attach(self, weight: torch.Tensor, requires_grad: bool) -> None:
        """Install a storage tensor (host memory or a memory map) as this table's weight."""
        if tuple(weight.shape) != (self.num_embeddings, self.head_dim):
            raise ValueError(
                f"Engram table weight has shape {tuple(weight.shape)}, the config needs "
                f"({self.num_embeddings}, {self.head_dim}) (rows from engram_table_sizes, n_embed_per_ngram / heads)."
            )
        self.weight = nn.Parameter(weight, requires_grad=requires_grad)

    def _apply(self, fn, recurse=True):
        if self.storage == "device" or self.weight is None:
            return super()._apply(fn, recurse)
        weight = self._parameters.pop("weight")  # host/disk tables never follow the model
        try:
            return super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = weight

    def _gather_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """`weight[ids]` where the table lives; disk tables fault their pages in from several threads at once."""
        if self.storage != "disk" or ids.numel() < 1024:
            return F.embedding(ids, self.weight, sparse=self.sparse)
        readers = _executor("engram-disk-read", DISK_READ_CHUNKS)
        parts = [readers.submit(F.embedding, part, self.weight) for part in ids.chunk(DISK_READ_CHUNKS)]
        return torch.cat([part.result() for part in parts])

    def _read(self, unique: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.cuda.Event]:
        """Rows of the unique ids, copied to the ids' device (a CUDA side stream when that is a GPU)."""
        device = unique.device
        rows = self._gather_rows(unique.to(self.weight.device))
        if device.type != "cuda" or rows.device == device or rows.requires_grad:
            return rows.to(device)  # a trainable host table copies synchronously, so autograd sees the copy
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device)
        with torch.cuda.stream(self._copy_stream):
            staged = rows.pin_memory() if not rows.is_pinned() else rows
            moved = staged.to(device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        return moved, event

    def _gather_unique(self, unique: torch.Tensor, grad_enabled: bool):
        with torch.set_grad_enabled(grad_enabled):
            use_cache = self.cache is not None and not (grad_enabled and self.weight.requires_grad)
            if not use_cache:
                return self._read(unique)
            hit, slot = self.cache.lookup(unique)
            missing = unique[~hit]
            read = self._read(missing)
            if isinstance(read, tuple):
                torch.cuda.current_stream(unique.device).wait_event(read[1])
                read = read[0]
            rows = torch.empty(unique.shape[0], self.head_dim, dtype=self.weight.dtype, device=unique.device)
            rows[~hit] = read
            if self.cache.rows is not None:
                rows[hit] = self.cache.rows[slot[hit]]
            self.cache.lookups += unique.numel()
            self.cache.hits += int(hit.sum())
            self.cache.record(unique.to(self.weight.device), self.weight, unique.device)
            return rows

    def fetch(self, hash_ids: torch.LongTensor, asynchronous: bool = False) -> RowFetch:
        if self.storage == "device" and self.cache is None and use_triton(self.kernel, hash_ids, self.weight):
            rows = load_kernels().gather_rows(self.weight, hash_ids, self.offsets, sparse_grad=self.sparse)
            return RowFetch(rows.unflatten(-1, (len(self.table_sizes), self.head_dim)))
        ids = hash_ids + self.offsets.to(hash_ids.device)
        if self.storage == "device" and self.cache is None:
            return RowFetch(F.embedding(ids, self.weight, sparse=self.sparse))
        unique, inverse = torch.unique(ids, return_inverse=True)
        grad_enabled = torch.is_grad_enabled()
        if asynchronous:
            prefetch = _executor("engram-prefetch", 4).submit(self._gather_unique, unique, grad_enabled)
            return RowFetch(prefetch, inverse)
        return RowFetch(self._gather_unique(unique, grad_enabled), inverse)

    def forward(self, hash_ids: torch.LongTensor) -> torch.Tensor:
        return self.fetch(hash_ids).wait()

    def extra_repr(self) -> str:
        cache = f", cache_rows={self.cache.capacity}" if self.cache is not None else ""
        return (
            f"heads={len(self.table_sizes)}, rows={self.num_embeddings}, head_dim={self.head_dim}, "
            f"storage={self.storage}{cache}"
        )


def attach_checkpoint_tables(model: nn.Module, checkpoint_files: list[str] | None) -> None:
    """Give every external (host/disk) table of `model` its weight from the checkpoint's safetensors files.

    "disk" maps the file pages (nothing is read until rows are gathered); "host" copies the table into CPU
    memory, pinned when CUDA is present.
    """
    tables = {name: m for name, m in model.named_modules() if isinstance(m, EngramTable) and m.weight is None}
    if not tables:
        return
    files = [f for f in checkpoint_files or [] if f.endswith(".safetensors")]
    if not files:
        raise ValueError("host/disk Engram tables are read from safetensors checkpoints; none was found.")
    index = {key: (path, entry) for path in files for key, entry in safetensors_index(path).items()}
    for name, table in tables.items():
        key = f"{name}.weight"
        candidates = [key, key.removeprefix("model."), f"model.{key}"]
        found = next((index[c] for c in candidates if c in index), None)
        if found is None:
            raise ValueError(f"checkpoint has no tensor {key!r} for an Engram table with storage={table.storage!r}")
        mapping = FileMapping(*found)
        if table.storage == "host":
            weight = torch.empty(mapping.tensor.shape, dtype=mapping.tensor.dtype, pin_memory=torch.cuda.is_available())
            table.attach(weight.copy_(mapping.tensor), requires_grad=True)
        else:
            table.attach(mapping.tensor, requires_grad=False)
            table.mapping = mapping


__all__ = ["EngramTable", "FileMapping", "HotRowCache", "RowFetch", "attach_checkpoint_tables", "safetensors_index"]
