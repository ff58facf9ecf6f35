"""Engram memory tables: the parameter, its row format and the row gather; where the rows live is a storage.

All heads of all orders of one layer live in one flat table with per-head row offsets. Whatever the storage
(storage.py: device, host, disk, or row-sharded over ranks), only the rows a batch gathers ever move between devices:
ids are deduplicated on the execution device, the unique rows are read where the table lives and only they are
copied over.
"""

import json
import struct
from concurrent.futures import Future

import torch
from torch import nn
from torch.nn import functional as F

from .kernel_dispatch import checked_preference, load_kernels, use_triton
from .row_formats import (
    SCALE_BLOCK, RowFormat, check_scales, dequantize_fp8, get_row_format, pack_rows, quantize_fp8, unpack_rows,
)
from .storage import STORAGES, DeviceStorage, FileMapping, HotRowCache, TableStorage

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor as DTENSOR
else:  # builds without torch.distributed have no DTensors
    DTENSOR = ()

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
CONVERT_CHUNK_ROWS = 1 << 18  # rows re-encoded at a time by `EngramTable.convert_rows` (bounded scratch memory)


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


def rows_from_checkpoint(storage: str, loading: str | None) -> bool:
    """Whether a table in `storage` is built without rows, for `attach_checkpoint_tables` to read them from the
    checkpoint files (transformers' loader would materialise a table whole). `loading` is what `from_pretrained` tells
    the model it builds: "whole" (host/disk tables are read so), "sharded" (`engram_table_parallel`: every table, each
    rank its own rows), or None for a model built from a config (every table gets its rows now)."""
    return loading == "sharded" or (loading == "whole" and storage != "device")


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
    """One layer's flat table `weight` [sum of head table sizes, head_dim], its rows held by `storage`.

    `forward(hash_ids [B, T, heads]) -> rows [B, T, heads * head_dim]`: head j reads row
    `offsets[j] + hash_ids[..., j]`. `fetch(hash_ids, asynchronous=True)` starts the same gather in the
    background and returns a `RowFetch`. The table keeps the parameter and the row format; `storage` (storage.py: one
    class per placement, named by `engram_storage`) decides where the rows live and how the unique rows of a batch
    reach the execution device, and `cache_rows > 0` puts a `HotRowCache` in front of it. Host and disk tables stay
    where they are when the model moves (`model.to("cuda")` moves everything else), and keep their stored dtype.
    `from_checkpoint`: the table is built without rows (`weight` None), which `attach` gives it later.

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
        from_checkpoint: bool = False,
    ):
        fmt = get_row_format(row_format, head_dim)
        rows = sum(table_sizes)  # the weight is filled by `_init_weights` or a checkpoint; never by nn.Embedding
        weight = torch.empty(rows, head_dim, dtype=fmt and fmt.dtype, device="meta" if from_checkpoint else None)
        super().__init__(rows, head_dim, _weight=weight, _freeze=fmt is not None and not fmt.trainable)
        self.format: RowFormat | None = fmt
        self.kernel = checked_preference(kernel)  # engram_kernel preference for the device-table gather
        self.table_sizes = list(table_sizes)
        self.head_dim = head_dim
        self.storage: TableStorage = STORAGES[storage]()
        self.cache = HotRowCache(self.storage, cache_rows) if cache_rows > 0 else None
        scales = None  # FP8 block scales [rows, head_dim / 32]
        if self.scaled and not from_checkpoint:
            scales = torch.empty(rows, head_dim // SCALE_BLOCK, dtype=torch.uint8, device=weight.device)
        self.register_buffer("weight_scale", scales)
        if from_checkpoint:
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

    def __setattr__(self, name, value):
        # FSDP2's fully_shard installs its DTensor parameters with setattr on modules that define __setattr__: the one
        # point where a table it was asked to shard can refuse, before any all-gather.
        if name == "weight" and isinstance(value, DTENSOR):
            raise ValueError(
                "FSDP would shard an Engram table as one dense parameter: it would all-gather the whole table at every "
                "forward and step every row. Shard the tables by rows and leave them out of FSDP: "
                "modeling_engram.shard_engram_model(model, fsdp=True) does both, and so does the package's trainer "
                "under FSDP2 with shard_tables=True."
            )
        super().__setattr__(name, value)

    @property
    def stored_block(self) -> range:
        """The rows of the whole table [num_embeddings, head_dim] that this process stores, as `weight` rows 0, 1, ...:
        all of them, or a rank's block when the rows are sharded (`storage.block`)."""
        return range(self.num_embeddings)[self.storage.block]

    def attach(self, weight: torch.Tensor, scales: torch.Tensor | None = None) -> None:
        """Install rows held by `storage` (`storage.hold`) as this table's weight (and FP8 scales)."""
        self.check_stored(weight, scales, len(self.stored_block))
        trainable = not self.storage.read_only and (self.format is None or self.format.trainable)
        self.weight = nn.Parameter(weight, requires_grad=trainable)
        self.weight_scale = scales

    @torch.no_grad()
    def keep_rows(self, sharded: TableStorage) -> None:
        """Keep only the rows `sharded.block` (a `table_parallel.RowShardedStorage` over this table's storage) and
        read rows through it.

        The whole table's storage is released at once (the old parameter is emptied and marked, so an optimizer
        built on it refuses to step). A table without a weight yet (a sharded load) reads its rows when attached.
        """
        self.storage = sharded
        if self.weight is None:
            return
        old = self.weight
        self.weight = nn.Parameter(sharded.own(old.detach()[sharded.block]), requires_grad=old.requires_grad)
        if self.weight_scale is not None:
            self.weight_scale = sharded.own(self.weight_scale[sharded.block])
        old._engram_sharded_away = True
        old.data = old.data.new_empty(0)

    def _apply(self, fn, recurse=True):
        if self.weight is None or (self.storage.follows_model and self.format is None):
            return super()._apply(fn, recurse)
        # Host/disk tables never follow the model; a device table with a row format follows its device only.
        weight, scales = self._parameters.pop("weight"), self._buffers.pop("weight_scale")
        try:
            result = super()._apply(fn, recurse)
        finally:
            self._parameters["weight"], self._buffers["weight_scale"] = weight, scales
        if self.storage.follows_model:
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

    def fetch(self, hash_ids: torch.LongTensor, asynchronous: bool = False) -> RowFetch:
        """Start gathering the rows of `hash_ids` [B, T, heads] (`asynchronous`: where the storage prefetches)."""
        unpack = self.unpack if self.scaled else None
        if isinstance(self.storage, DeviceStorage) and self.cache is None:  # in place: nothing to deduplicate or move
            if use_triton(self.kernel, hash_ids, self.weight):
                kernels = load_kernels()
                if self.scaled:
                    rows = kernels.gather_fp8_rows(self.weight, self.weight_scale, hash_ids, self.offsets)
                else:
                    rows = kernels.gather_rows(self.weight, hash_ids, self.offsets, sparse_grad=self.sparse)
                return RowFetch(rows.unflatten(-1, (len(self.table_sizes), self.head_dim)))
            return RowFetch(self.compact_rows(hash_ids + self.offsets.to(hash_ids.device)), unpack=unpack)
        unique, inverse = torch.unique(hash_ids + self.offsets.to(hash_ids.device), return_inverse=True)
        reader = self.storage if self.cache is None else self.cache
        rows = reader.prefetch(self, unique) if asynchronous else reader.read_unique(self, unique)
        return RowFetch(rows, inverse, unpack)

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
        if self.weight is None or self.storage.read_only:
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
        return (
            f"heads={len(self.table_sizes)}, rows={self.num_embeddings}, head_dim={self.head_dim}, "
            f"storage={self.storage}{row}{cache}"
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

    def mappings(self, name: str, table: EngramTable) -> tuple[FileMapping, FileMapping | None]:
        """Memory maps of table `name`'s values and FP8 scales (nothing is read yet), checked against `table`."""
        found = self.find(f"{name}.weight")
        if found is None:
            raise ValueError(
                f"checkpoint has no tensor {name + '.weight'!r} for an Engram table with storage={table.storage.name!r}"
            )
        values = FileMapping(*found)
        scale_entry = self.find(f"{name}.weight_scale")
        scales = FileMapping(*scale_entry) if scale_entry is not None else None
        table.check_stored(values.tensor, scales.tensor if scales is not None else None, table.num_embeddings)
        return values, scales


def check_checkpoint_tables(model: nn.Module, checkpoint_files: list[str] | None) -> None:
    """Before loading: every Engram table's tensors in the checkpoint must match its row format (FP8 values with
    scales of the right shape), so nothing is cast or left uninitialised behind a load report."""
    tables = [(name, m) for name, m in model.named_modules() if isinstance(m, EngramTable)]
    if tables:
        checkpoint = CheckpointTables(checkpoint_files)
        for name, table in tables:
            checkpoint.check(name, table)


def attach_checkpoint_tables(model: nn.Module, checkpoint_files: list[str] | None) -> None:
    """Give every table of `model` built without rows (host, disk, or sharded) its rows from the checkpoint's
    safetensors, as its storage holds them (`TableStorage.hold`).

    "disk" maps the file pages (nothing is read until rows are gathered); "host" copies the table into CPU
    memory, pinned when CUDA is present; "device" copies it to the model's device. A sharded table takes only its own
    rows: the slice of the memory map is all this process reads. FP8 tables bring their `weight_scale` the same way.
    """
    tables = {name: m for name, m in model.named_modules() if isinstance(m, EngramTable) and m.weight is None}
    if not tables:
        return
    checkpoint = CheckpointTables(checkpoint_files)
    if not checkpoint.index:
        raise ValueError("host/disk/sharded Engram tables are read from safetensors checkpoints; none was found.")
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    for name, table in tables.items():
        storage, block = table.storage, table.storage.block
        values, scales = checkpoint.mappings(name, table)
        table.attach(storage.hold(values, block, device),
                     storage.hold(scales, block, device) if scales is not None else None)


__all__ = [
    "CheckpointTables", "EngramTable", "RowFetch", "attach_checkpoint_tables", "check_checkpoint_tables",
    "rows_from_checkpoint", "safetensors_index",
]
