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
from .row_formats import (
    SCALE_BLOCK, RowFormat, check_scales, dequantize_fp8, get_row_format, pack_rows, quantize_fp8, unpack_rows,
)

# Set by `EngramPreTrainedModel.from_pretrained`: host/disk tables are then read from the checkpoint files by
# `attach_checkpoint_tables`, never by transformers' loader (which would materialise them whole).
EXTERNAL_TABLES = contextvars.ContextVar("engram_external_tables", default=False)
# Set by `from_pretrained(..., engram_table_parallel=True)`: device tables are then external too, so each rank reads
# only its own rows from the checkpoint (`attach_checkpoint_tables`); see table_parallel.py.
SHARDED_TABLES = contextvars.ContextVar("engram_sharded_tables", default=False)

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
SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
_executors: dict[str, ThreadPoolExecutor] = {}
_executor_lock = threading.Lock()
DISK_READ_CHUNKS = 8  # concurrent page-fault readers per disk gather: SSDs serve random reads best at depth > 1
CONVERT_CHUNK_ROWS = 1 << 18  # rows re-encoded at a time by `EngramTable.convert_rows` (bounded scratch memory)


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

    def lookup(self, unique: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hit mask, cache slot) for sorted unique ids on the execution device."""
        if self.ids is None:
            return torch.zeros_like(unique, dtype=torch.bool), torch.zeros_like(unique)
        slot = torch.searchsorted(self.ids, unique).clamp_(max=self.ids.numel() - 1)
        return self.ids[slot] == unique, slot

    def record(self, unique_on_storage: torch.Tensor, table: "EngramTable", device: torch.device) -> None:
        if self.counts is None:
            self.counts = torch.zeros(table.num_embeddings, dtype=torch.int32, device=unique_on_storage.device)
        self.counts.index_add_(0, unique_on_storage, torch.ones_like(unique_on_storage, dtype=torch.int32))
        self.fetches += 1
        if self.fetches % self.refresh_every == 0:
            self.refresh(table, device)

    @torch.no_grad()
    def refresh(self, table: "EngramTable", device: torch.device) -> None:
        k = min(self.capacity, int(torch.count_nonzero(self.counts)))
        if k == 0:
            return
        top = torch.topk(self.counts, k, sorted=False).indices.sort().values
        self.rows = table.compact_rows(top).to(device)
        self.ids = top.to(device)


class RowFetch:
    """A started row gather: `wait()` returns the rows [B, T, heads * head_dim] on the execution device.

    The gather moves compact rows (`pack_rows`); `wait` decodes them (`unpack_rows`, FP8 dequantised) on the
    execution device, once per unique row, before spreading them over the positions (`inverse`).
    """

    def __init__(self, result: torch.Tensor | Future, inverse: torch.Tensor | None = None, unpack=None):
        self._result = result
        self._inverse = inverse
        self._unpack = unpack

    def wait(self) -> torch.Tensor:
        rows = self._result.result() if isinstance(self._result, Future) else self._result
        if isinstance(rows, tuple):  # (rows, cuda event) from a side-stream copy
            rows, event = rows
            torch.cuda.current_stream(rows.device).wait_event(event)
            rows.record_stream(torch.cuda.current_stream(rows.device))
        if self._unpack is not None:
            rows = self._unpack(rows)
        if self._inverse is not None:
            rows = rows[self._inverse]
        return rows.flatten(-2)


class EngramTable(nn.Embedding):
    """One layer's flat table `weight` [sum of head table sizes, head_dim], stored per `storage`.

    `forward(hash_ids [B, T, heads]) -> rows [B, T, heads * head_dim]`: head j reads row
    `offsets[j] + hash_ids[..., j]`. `fetch(hash_ids, asynchronous=True)` starts the same gather in the
    background and returns a `RowFetch`. Host and disk tables stay where they are when the model moves
    (`model.to("cuda")` moves everything else), and keep their stored dtype.

    `row_format` (`engram_row_format`) fixes how rows are stored, whatever the model's dtype: "fp32", "bf16",
    "fp16", or "fp8_e4m3" (e4m3 `weight` plus ue8m0 `weight_scale` [rows, head_dim / 32], see row_formats.py);
    None keeps rows in the model's dtype. Gathers read and move compact rows only and decode them after the copy.

    An `nn.Embedding` for its `sparse` flag (off by default): `training.py` turns it on, and the weight then gets
    sparse gradients over the gathered rows only, which DistributedDataParallel (it recognises embeddings by type)
    all-reduces sparsely.
    """

    def __init__(
        self,
        table_sizes: list[int],
        head_dim: int,
        storage: str = "device",
        cache_rows: int = 0,
        kernel: str = "auto",
        row_format: str | None = None,
    ):
        external = (storage != "device" or SHARDED_TABLES.get()) and EXTERNAL_TABLES.get()
        fmt = get_row_format(row_format, head_dim)
        rows = sum(table_sizes)  # the weight is filled by `_init_weights` or a checkpoint; never by nn.Embedding
        weight = torch.empty(rows, head_dim, dtype=fmt and fmt.dtype, device="meta" if external else None)
        super().__init__(rows, head_dim, _weight=weight, _freeze=fmt is not None and not fmt.trainable)
        self.format: RowFormat | None = fmt
        self.kernel = checked_preference(kernel)  # engram_kernel preference for the device-table gather
        self.table_sizes = list(table_sizes)
        self.head_dim = head_dim
        self.storage = storage
        self.cache = HotRowCache(cache_rows) if cache_rows > 0 else None
        self.row_shard = None  # a `table_parallel.RowShard` when the rows are sharded over ranks (`keep_rows`)
        self.mapping: FileMapping | None = None  # disk storage: the memory map behind `weight`
        self.scale_mapping: FileMapping | None = None  # ... and behind `weight_scale`
        self._copy_stream = None
        scales = None  # FP8 block scales [rows, head_dim / 32]
        if self.scaled and not external:
            scales = torch.empty(rows, head_dim // SCALE_BLOCK, dtype=torch.uint8, device=weight.device)
        self.register_buffer("weight_scale", scales)
        if external:
            self.register_parameter("weight", None)  # read from the checkpoint by `attach_checkpoint_tables`
        self.offsets = nn.Buffer(self.head_offsets(), persistent=False)

    def head_offsets(self) -> torch.Tensor:
        sizes = torch.tensor(self.table_sizes, dtype=torch.long)
        return torch.cumsum(sizes, 0) - sizes

    @property
    def scaled(self) -> bool:
        return self.format is not None and self.format.scaled

    def check_stored(self, weight: torch.Tensor, scales: torch.Tensor | None, rows: int) -> None:
        """Raise a ValueError unless `weight` (and FP8 `scales`) can hold `rows` rows of this table."""
        if tuple(weight.shape) != (rows, self.head_dim):
            raise ValueError(
                f"Engram table weight has shape {tuple(weight.shape)}, the config needs "
                f"({rows}, {self.head_dim}) (rows from engram_table_sizes, n_embed_per_ngram / heads)."
            )
        if self.format is not None and weight.dtype != self.format.dtype:
            raise ValueError(
                f"Engram table weight is stored as {weight.dtype}, but engram_row_format={self.format.name!r} stores "
                f"{self.format.dtype}: convert the checkpoint with `model.quantize_engram_tables(...)` and save it."
            )
        if self.scaled:
            check_scales("Engram table", weight, scales)
        elif scales is not None:
            raise ValueError(f"Engram table has a scale tensor, but its rows are {weight.dtype}, not FP8.")

    @property
    def stored_row_count(self) -> int:
        """Rows this process stores: the whole table, or its shard's block."""
        shard = self.row_shard
        return self.num_embeddings if shard is None else shard.stop - shard.start

    def attach(self, weight: torch.Tensor, requires_grad: bool, scales: torch.Tensor | None = None) -> None:
        """Install a storage tensor (host memory or a memory map) as this table's weight (and FP8 scales)."""
        self.check_stored(weight, scales, self.stored_row_count)
        trainable = self.format is None or self.format.trainable
        self.weight = nn.Parameter(weight, requires_grad=requires_grad and trainable)
        self.weight_scale = scales

    @torch.no_grad()
    def keep_rows(self, shard) -> None:
        """Keep only the rows `[shard.start, shard.stop)` of a `table_parallel.RowShard` and look rows up through it.

        The whole table's storage is released at once (the old parameter is emptied and marked, so an optimizer
        built on it refuses to step). A table without a weight yet (a sharded load) reads its rows when attached.
        """
        self.row_shard = shard
        if self.weight is None:
            return
        old, block = self.weight, slice(shard.start, shard.stop)

        def own(tensor):
            if self.storage == "disk":
                return tensor[block]  # a view of the memory map: only these rows' pages are ever read
            return torch.empty_like(tensor[block], pin_memory=tensor.is_pinned()).copy_(tensor[block])

        self.weight = nn.Parameter(own(old.detach()), requires_grad=old.requires_grad)
        if self.weight_scale is not None:
            self.weight_scale = own(self.weight_scale)
        old._engram_sharded_away = True
        old.data = old.data.new_empty(0)

    def _apply(self, fn, recurse=True):
        if self.weight is None or (self.storage == "device" and self.format is None):
            return super()._apply(fn, recurse)
        # Host/disk tables never follow the model; a device table with a row format follows its device only.
        weight, scales = self._parameters.pop("weight"), self._buffers.pop("weight_scale")
        try:
            result = super()._apply(fn, recurse)
        finally:
            self._parameters["weight"], self._buffers["weight_scale"] = weight, scales
        if self.storage == "device":
            device = fn(weight.detach()[:0]).device  # where `fn` sends tensors, without converting the table
            if device != weight.device:
                self.weight = nn.Parameter(weight.to(device), requires_grad=weight.requires_grad)
                self.weight_scale = scales.to(device) if scales is not None else None
        return result

    def compact_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Stored rows `ids` as gathers move them, where the table lives: [U, head_dim] values, or for FP8 uint8
        [U, head_dim + head_dim / 32] (value bytes, then scale bytes)."""
        if self.weight_scale is None:
            return F.embedding(ids, self.weight, sparse=self.sparse)
        return pack_rows(F.embedding(ids, self.weight.detach().view(torch.uint8)), F.embedding(ids, self.weight_scale))

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Rows [..., head_dim] from `compact_rows` output: FP8 dequantised to bf16 (exact), others as stored."""
        return unpack_rows(packed, self.head_dim, torch.bfloat16)

    def _gather_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """`compact_rows(ids)`; disk tables fault their pages in from several threads at once."""
        if self.storage != "disk" or ids.numel() < 1024:
            return self.compact_rows(ids)
        readers = _executor("engram-disk-read", DISK_READ_CHUNKS)
        parts = [readers.submit(self.compact_rows, part) for part in ids.chunk(DISK_READ_CHUNKS)]
        return torch.cat([part.result() for part in parts])

    def _read(self, unique: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.cuda.Event]:
        """Compact rows of the unique ids, copied to the ids' device (a CUDA side stream when that is a GPU)."""
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
            read = self._read(unique[~hit])
            if isinstance(read, tuple):
                torch.cuda.current_stream(unique.device).wait_event(read[1])
                read = read[0]
            rows = read.new_empty(unique.shape[0], read.shape[1])
            rows[~hit] = read
            if self.cache.rows is not None:
                rows[hit] = self.cache.rows[slot[hit]]
            self.cache.lookups += unique.numel()
            self.cache.hits += int(hit.sum())
            self.cache.record(unique.to(self.weight.device), self, unique.device)
            return rows

    def fetch(self, hash_ids: torch.LongTensor, asynchronous: bool = False) -> RowFetch:
        unpack = self.unpack if self.scaled else None
        if self.row_shard is not None:  # a collective: every rank looks up in the same order, in this thread
            unique, inverse = torch.unique(hash_ids + self.offsets.to(hash_ids.device), return_inverse=True)
            return RowFetch(self.row_shard.lookup(self, unique), inverse, unpack)
        if self.storage == "device" and self.cache is None and use_triton(self.kernel, hash_ids, self.weight):
            kernels = load_kernels()
            if self.scaled:
                rows = kernels.gather_fp8_rows(self.weight, self.weight_scale, hash_ids, self.offsets)
            else:
                rows = kernels.gather_rows(self.weight, hash_ids, self.offsets, sparse_grad=self.sparse)
            return RowFetch(rows.unflatten(-1, (len(self.table_sizes), self.head_dim)))
        ids = hash_ids + self.offsets.to(hash_ids.device)
        if self.storage == "device" and self.cache is None:
            return RowFetch(self.compact_rows(ids), unpack=unpack)
        unique, inverse = torch.unique(ids, return_inverse=True)
        grad_enabled = torch.is_grad_enabled()
        if asynchronous:
            prefetch = _executor("engram-prefetch", 4).submit(self._gather_unique, unique, grad_enabled)
            return RowFetch(prefetch, inverse, unpack)
        return RowFetch(self._gather_unique(unique, grad_enabled), inverse, unpack)

    def forward(self, hash_ids: torch.LongTensor) -> torch.Tensor:
        return self.fetch(hash_ids).wait()

    def stored_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) decoded to fp32, where the table lives."""
        values = self.weight[start:stop].detach()
        if self.weight_scale is None:
            return values.float()
        return dequantize_fp8(values, self.weight_scale[start:stop])

    def _encode(self, rows_of, values: torch.Tensor, scales: torch.Tensor | None, progress=None) -> None:
        """Write `rows_of(start, stop)` (fp32 rows) into `values` (and FP8 `scales`), CONVERT_CHUNK_ROWS at a time."""
        for start in range(0, values.shape[0], CONVERT_CHUNK_ROWS):
            stop = min(start + CONVERT_CHUNK_ROWS, values.shape[0])
            rows = rows_of(start, stop)
            if scales is None:
                values[start:stop] = rows
            else:
                values[start:stop], scales[start:stop] = quantize_fp8(rows)
            if progress is not None:
                progress(stop - start)

    @torch.no_grad()
    def init_fp8_rows(self, std: float) -> None:
        """Draw N(0, std) rows and store them quantised (FP8 tensors have no `normal_`); keeps loaded rows."""
        if getattr(self.weight, "_is_hf_initialized", False) or self.weight.device.type == "meta":
            return
        device = self.weight.device
        self._encode(lambda start, stop: torch.randn(stop - start, self.head_dim, device=device) * std,
                     self.weight.data, self.weight_scale)

    @torch.no_grad()
    def convert_rows(self, name: str, progress=None) -> None:
        """Re-store every row in row format `name` (FP8: quantised per block of 32), in place of the old rows.

        Works on device and host tables, `CONVERT_CHUNK_ROWS` rows at a time; `progress(rows)` is called after each
        chunk. A disk table is a memory map of its checkpoint: convert the model before saving it instead.
        """
        target = get_row_format(name, self.head_dim)
        if self.weight is None or self.storage == "disk":
            raise ValueError(
                "convert the Engram tables of a model loaded with engram_storage='device' or 'host', then save it; "
                "this table is memory-mapped from its checkpoint (engram_storage='disk')."
            )
        device, pinned = self.weight.device, self.weight.is_pinned()
        values = torch.empty(self.weight.shape, dtype=target.dtype, device=device, pin_memory=pinned)
        scales = None
        if target.scaled:
            scales = torch.empty(self.weight.shape[0], self.head_dim // SCALE_BLOCK, dtype=torch.uint8, device=device,
                                 pin_memory=pinned)
        self._encode(self.stored_rows, values, scales, progress)
        # FP8 rows are frozen by their format, not by choice: converted back, they train again.
        requires_grad = self.weight.requires_grad or (self.format is not None and not self.format.trainable)
        self.format = target
        self.weight = nn.Parameter(values, requires_grad=requires_grad and target.trainable)
        self.weight_scale = scales
        if self.cache is not None:
            self.cache.clear()

    def extra_repr(self) -> str:
        cache = f", cache_rows={self.cache.capacity}" if self.cache is not None else ""
        row = f", row_format={self.format.name}" if self.format is not None else ""
        shard = f", shard={self.row_shard}" if self.row_shard is not None else ""
        return (
            f"heads={len(self.table_sizes)}, rows={self.num_embeddings}, head_dim={self.head_dim}, "
            f"storage={self.storage}{row}{cache}{shard}"
        )


class CheckpointTables:
    """Where each Engram table tensor lies in a checkpoint's safetensors files, read from their headers only."""

    def __init__(self, checkpoint_files: list[str] | None):
        files = [f for f in checkpoint_files or [] if f.endswith(".safetensors")]
        self.index = {key: (path, entry) for path in files for key, entry in safetensors_index(path).items()}

    def find(self, key: str) -> tuple[str, tuple] | None:
        """(file, header entry) of `key`, with or without the "model." prefix of the causal-LM wrapper."""
        return next((self.index[c] for c in (key, key.removeprefix("model."), f"model.{key}") if c in self.index), None)

    def check(self, name: str, table: EngramTable) -> None:
        """Raise a ValueError unless the checkpoint stores `table` (module `name`) in its row format."""
        values, scales = self.find(f"{name}.weight"), self.find(f"{name}.weight_scale")
        if values is None:
            return  # a missing table is transformers' report (device) or `attach_checkpoint_tables`' error
        (path, (dtype, shape, _, _)) = values
        stored = table.format.name if table.format is not None else "the model's dtype (engram_row_format=None)"
        if (table.format is not None and dtype != table.format.dtype) or (table.format is None and scales is not None):
            raise ValueError(
                f"checkpoint {path}: {name}.weight is {dtype}{' with a weight_scale' if scales else ''}, but the "
                f"config stores these rows as {stored}; the config and the checkpoint disagree."
            )
        if table.scaled:
            scale = None if scales is None else torch.empty(scales[1][1], dtype=scales[1][0], device="meta")
            check_scales(f"checkpoint {path}: {name}", torch.empty(shape, dtype=dtype, device="meta"), scale)

    def stored_rows(self, name: str, table: EngramTable):
        """(values map, scales map or None, values, scales): the memory maps of table `name`'s tensors and the rows
        this process stores of them (a sharded table's block: a view, nothing is read yet)."""
        found = self.find(f"{name}.weight")
        if found is None:
            raise ValueError(
                f"checkpoint has no tensor {name + '.weight'!r} for an Engram table with storage={table.storage!r}"
            )
        mapping = FileMapping(*found)
        scale_entry = self.find(f"{name}.weight_scale")
        scale_mapping = FileMapping(*scale_entry) if scale_entry is not None else None
        values, scales = mapping.tensor, scale_mapping.tensor if scale_mapping is not None else None
        table.check_stored(values, scales, table.num_embeddings)
        if table.row_shard is not None:
            block = slice(table.row_shard.start, table.row_shard.stop)
            values, scales = values[block], scales[block] if scales is not None else None
        return mapping, scale_mapping, values, scales


def check_checkpoint_tables(model: nn.Module, checkpoint_files: list[str] | None) -> None:
    """Before loading: every Engram table's tensors in the checkpoint must match its row format (FP8 values with
    scales of the right shape), so nothing is cast or left uninitialised behind a load report."""
    tables = [(name, m) for name, m in model.named_modules() if isinstance(m, EngramTable)]
    if tables:
        checkpoint = CheckpointTables(checkpoint_files)
        for name, table in tables:
            checkpoint.check(name, table)


def attach_checkpoint_tables(model: nn.Module, checkpoint_files: list[str] | None) -> None:
    """Give every external table of `model` (host, disk, or sharded) its weight from the checkpoint's safetensors.

    "disk" maps the file pages (nothing is read until rows are gathered); "host" copies the table into CPU
    memory, pinned when CUDA is present. A sharded table (`row_shard`) takes only its own rows: the slice of the
    memory map is all this process reads, into the model's device for "device" tables. FP8 tables bring their
    `weight_scale` the same way.
    """
    tables = {name: m for name, m in model.named_modules() if isinstance(m, EngramTable) and m.weight is None}
    if not tables:
        return
    checkpoint = CheckpointTables(checkpoint_files)
    if not checkpoint.index:
        raise ValueError("host/disk/sharded Engram tables are read from safetensors checkpoints; none was found.")
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    for name, table in tables.items():
        mapping, scale_mapping, values, scales = checkpoint.stored_rows(name, table)
        if table.storage == "disk":
            table.attach(values, requires_grad=False, scales=scales)
            table.mapping, table.scale_mapping = mapping, scale_mapping
            continue
        target = dict(pin_memory=torch.cuda.is_available()) if table.storage == "host" else dict(device=device)
        copies = [None if t is None else torch.empty(t.shape, dtype=t.dtype, **target).copy_(t) for t in (values, scales)]
        table.attach(copies[0], requires_grad=True, scales=copies[1])


__all__ = [
    "CheckpointTables", "EngramTable", "FileMapping", "HotRowCache", "RowFetch", "attach_checkpoint_tables",
    "check_checkpoint_tables", "safetensors_index",
]
