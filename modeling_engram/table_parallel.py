"""Row-owner sharding of Engram tables over torch.distributed ranks (`shard_engram_tables`, the one switch).

Rank r owns the contiguous rows `[starts[r], starts[r + 1])` of every table (`row_blocks`: `torch.chunk`'s blocks)
and only those rows, plus their Adam moments (the optimizer is built on the shards). A lookup deduplicates the
batch's row ids, sends each id to its owner (`all_to_all`), the owner reads its rows, and the rows come back
(`all_to_all`). Backward routes each row's gradient to its owner the same way; the owner sums them into a sparse
gradient of its shard, averaged over ranks as DistributedDataParallel averages the rest, and the lazy Adam of
`training.py` updates those rows alone. Every exchange is proportional to the batch's unique rows, never to the
table. NCCL and gloo both have `all_to_all_single`: no sparse all-reduce is needed.

What torch and transformers do not do for such tables, and this file adds at their seams:
- DDP leaves the shards alone (`_ddp_params_and_buffers_to_ignore`, DDP's own exclusion list);
- `save_pretrained` writes a standard safetensors checkpoint, each rank streaming its own rows into one table file
  (`save_table_shards`), and loading reads only each rank's rows (`memory.attach_checkpoint_tables` slices the
  memory map);
- every rank checks at setup that all ranks hold the same Engram config (`check_same_engram_config`).

This file is exported with a model (`trust_remote_code`), so it holds what loading, running and saving need.
Training across ranks (the global gradient norm, resuming, the stale-optimizer check) is in `sharded_training.py`.
"""

import hashlib
import json
import os
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from .memory import SAFETENSORS_NAMES, EngramTable, safetensors_index
from .storage import TableStorage

TABLE_FILE = "model-engram-tables.safetensors"
BACKBONE_FILE = "model-backbone.safetensors"
INDEX_FILE = "model.safetensors.index.json"
WRITE_CHUNK_ROWS = 1 << 16  # rows copied to host memory and written at a time by `save_table_shards`
# What every rank must agree on (compared as digests at setup): the hash and the table layout.
DIGEST_FIELDS = (
    "engram_layer_ids", "max_ngram_size", "n_head_per_ngram", "n_embed_per_ngram", "engram_seed", "engram_pad_id",
    "engram_compressed_vocab_size", "engram_multipliers", "engram_table_sizes", "engram_row_format",
    "engram_dead_token_ids",
)


def row_blocks(rows: int, world_size: int) -> list[int]:
    """Start row of every rank's block, plus `rows` at the end: blocks of ceil(rows / world_size) rows, the last one
    smaller. `torch.chunk` cuts the same blocks, and so does DTensor's `Shard(0)`, so a rank's block is the local
    tensor of a `Shard(0)` DTensor of the whole table: what a resharding checkpoint (torch.distributed.checkpoint)
    saves and loads onto any number of ranks."""
    size = -(-rows // world_size)
    starts = [min(rank * size, rows) for rank in range(world_size + 1)]
    if starts[-2] == rows:
        raise ValueError(f"a table of {rows} rows cannot be sharded over {world_size} ranks: blocks of {size} rows "
                         f"(torch.chunk's layout) leave rank {world_size - 1} without a row, and every rank needs one.")
    return starts


def require_process_group() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("Engram table sharding runs over torch.distributed: initialise a process group first "
                           "(launch with torchrun / accelerate launch; TrainingArguments or "
                           "torch.distributed.init_process_group initialises it).")


def _exchange(tensor: torch.Tensor, send_counts: list[int], receive_counts: list[int], group) -> torch.Tensor:
    """`all_to_all_single` of the rows of `tensor` [sum(send_counts), ...] -> [sum(receive_counts), ...]."""
    out = tensor.new_empty((sum(receive_counts), *tensor.shape[1:]))
    dist.all_to_all_single(out, tensor.contiguous(), receive_counts, send_counts, group=group)
    return out


class _OwnerLookup(torch.autograd.Function):
    """rows of sorted unique global ids [U], from the shards of all ranks; backward: sparse shard gradient."""

    @staticmethod
    def forward(ctx, shard, ids, starts, group, read, grad_scale, sparse):
        world = dist.get_world_size(group)
        owners = torch.searchsorted(starts[1:-1], ids, right=True)  # ids are sorted, so owners are too
        send_counts = torch.bincount(owners, minlength=world)
        receive_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(receive_counts, send_counts, group=group)
        send_counts, receive_counts = send_counts.tolist(), receive_counts.tolist()
        requested = _exchange(ids, send_counts, receive_counts, group)  # ids other ranks ask this rank for
        local = (requested - starts[dist.get_rank(group)]).to(shard.device)
        rows = _exchange(read(local).to(ids.device), receive_counts, send_counts, group)
        ctx.save_for_backward(local)
        ctx.counts, ctx.group, ctx.shard_shape = (send_counts, receive_counts), group, shard.shape
        ctx.grad_scale, ctx.sparse = grad_scale, sparse
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        (local,) = ctx.saved_tensors
        send_counts, receive_counts = ctx.counts
        grads = _exchange(grad_rows, send_counts, receive_counts, ctx.group)  # to the owners, in request order
        grads = grads.to(local.device) * ctx.grad_scale
        grad_shard = torch.sparse_coo_tensor(local[None], grads, ctx.shard_shape).coalesce()
        return grad_shard if ctx.sparse else grad_shard.to_dense(), None, None, None, None, None, None


def owner_lookup(
    shard: nn.Parameter,
    ids: torch.LongTensor,
    starts: torch.LongTensor,
    group=None,
    read=None,
    grad_scale: float = 1.0,
    sparse: bool = True,
) -> torch.Tensor:
    """Rows of the sorted unique global row ids `ids` [U] (each rank passes its own), where this rank holds
    `shard` = rows `[starts[rank], starts[rank + 1])`. Collective: every rank of `group` must call it, in the same
    order. `read(local ids)` gives this rank's stored rows (default `shard[local]`; FP8 tables send packed bytes);
    the gradient of `shard` is the sum of every rank's row gradients times `grad_scale`, sparse unless `sparse` is
    False."""
    require_process_group()
    read = read if read is not None else shard.detach().__getitem__
    return _OwnerLookup.apply(shard, ids, starts.to(ids.device), group, read, grad_scale, sparse)


class RowShardedStorage(TableStorage):
    """The placement of a table whose rows are split over the ranks of `group`: this rank (`rank`) holds the block
    `[starts[rank], starts[rank + 1])` (`row_blocks`) in its `local` storage (device, host or disk), and a lookup is
    the exchange of `owner_lookup`: a collective, so it runs in the caller's thread, prefetched or not."""

    def __init__(self, local: TableStorage, starts: list[int], rank: int, group):
        self.local, self.starts, self.rank, self.group = local, starts, rank, group
        self.world_size = len(starts) - 1
        self.start, self.stop = starts[rank], starts[rank + 1]
        self.block = slice(self.start, self.stop)
        self.name, self.follows_model, self.read_only = local.name, local.follows_model, local.read_only
        self.prefetches = local.prefetches
        self._starts = torch.tensor(starts)

    def empty(self, shape, dtype, device):
        return self.local.empty(shape, dtype, device)

    def own(self, rows):
        return self.local.own(rows)

    def hold(self, mapping, block, device):
        return self.local.hold(mapping, block, device)

    def gather(self, table, ids):
        return self.local.gather(table, ids)

    def read_unique(self, table, unique):
        if self._starts.device != unique.device:  # moved once, not per lookup
            self._starts = self._starts.to(unique.device)
        return owner_lookup(table.weight, unique, self._starts, self.group, read=partial(self.gather, table),
                            grad_scale=1.0 / self.world_size, sparse=table.sparse)

    def prefetch(self, table, unique):
        return self.read_unique(table, unique)  # every rank exchanges in the same order: never on another thread

    def __repr__(self) -> str:
        return (f"{self.local!r}, shard=rows {self.start}..{self.stop - 1} of {self.starts[-1]} "
                f"(rank {self.rank} of {self.world_size})")


def sharded_tables(model: nn.Module) -> dict[str, EngramTable]:
    """The Engram tables of `model` that are sharded over ranks, by module name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, EngramTable) and isinstance(m.storage, RowShardedStorage)}


def _engram_config(model: nn.Module):
    return next(m.config for m in model.modules() if hasattr(getattr(m, "config", None), "engram_table_sizes"))


def engram_config_digests(model: nn.Module) -> dict[str, str]:
    """A short digest of every field the ranks of a sharded model must agree on, plus the installed token map."""
    config = _engram_config(model)
    fields = {name: json.dumps(getattr(config, name, None)) for name in DIGEST_FIELDS}
    fields["token map"] = next(
        hashlib.sha256(m.token_map.cpu().numpy().tobytes()).hexdigest()
        for m in model.modules() if isinstance(getattr(m, "token_map", None), torch.Tensor)
    )
    return {name: hashlib.sha256(value.encode()).hexdigest()[:16] for name, value in fields.items()}


def check_same_engram_config(model: nn.Module, group=None) -> None:
    """Raise on every rank (so none hangs in a later exchange) unless all ranks of `group` hold the same Engram
    hash and table layout."""
    mine = engram_config_digests(model)
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    for rank, theirs in enumerate(everyone):
        differing = [name for name in mine if theirs.get(name) != everyone[0].get(name)]
        if differing:
            raise ValueError(
                f"rank {rank} disagrees with rank 0 on the Engram config ({', '.join(differing)}): sharded tables need "
                "every rank to load the same model (config, token map). Check the checkpoint path each rank loads."
            )


def shard_engram_tables(model: nn.Module, group=None) -> nn.Module:
    """Shard every Engram table of `model` by rows over the ranks of `group` (default: all), in place.

    Call it on every rank, after the process group is initialised and before building the optimizer and wrapping
    the model (`accelerator.prepare`, DDP). `from_pretrained(..., engram_table_parallel=True)` loads straight into
    shards instead, so no rank ever holds a whole table; a model built from a config is built whole, then cut here.
    Checks first that every rank holds the same Engram config. Returns `model`.
    """
    require_process_group()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("shard the Engram tables before wrapping the model in DistributedDataParallel "
                         "(accelerator.prepare): DDP must be told to leave the shards alone at construction.")
    tables = {name: m for name, m in model.named_modules() if isinstance(m, EngramTable)}
    if not tables:
        raise ValueError("shard_engram_tables: this model has no Engram tables.")
    if any(isinstance(table.storage, RowShardedStorage) for table in tables.values()):
        raise ValueError("shard_engram_tables: the Engram tables of this model are sharded already.")
    if any(table.cache is not None for table in tables.values()):
        raise ValueError("sharded Engram tables do not keep a hot-row cache: set engram_cache_rows=0.")
    check_same_engram_config(model, group)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    table_group = dist.new_group(ranks)  # the exchanges get their own group: they never interleave with DDP's
    rank, world = dist.get_rank(table_group), dist.get_world_size(table_group)
    blocks = [row_blocks(table.num_embeddings, world) for table in tables.values()]  # may refuse: cut nothing yet
    for table, starts in zip(tables.values(), blocks):
        table.keep_rows(RowShardedStorage(table.storage, starts, rank, table_group))
    ignored = [f"{name}.{tensor}" for name in tables for tensor in ("weight", "weight_scale", "offsets")]
    model._ddp_params_and_buffers_to_ignore = [*getattr(model, "_ddp_params_and_buffers_to_ignore", []), *ignored]
    return model


def save_table_shards(model: nn.Module, save_directory: str, is_main_process: bool) -> None:
    """Write the sharded tables of `model` into `save_directory/TABLE_FILE` and add them to the checkpoint's index.

    Collective, after the main process has saved everything else (`EngramPreTrainedModel.save_pretrained` does
    both): the main process writes the safetensors header and sizes the file, then every rank writes its own
    rows at their offsets, WRITE_CHUNK_ROWS rows at a time; no rank ever holds more than its shard. The folder
    must be shared by all ranks (one machine, or a shared file system).
    """
    tables = sharded_tables(model)
    group = next(iter(tables.values())).storage.group
    header, offset, layout = {}, 0, []
    for name, table in tables.items():
        for key, tensor in (("weight", table.weight), ("weight_scale", table.weight_scale)):
            if tensor is None:
                continue
            row_bytes = tensor[:1].numel() * tensor.element_size()
            width = list(tensor.shape[1:])
            size = table.num_embeddings * row_bytes
            header[f"{name}.{key}"] = {"dtype": SAFETENSORS_NAMES[tensor.dtype],
                                               "shape": [table.num_embeddings, *width],
                                               "data_offsets": [offset, offset + size]}
            layout.append((tensor, offset + table.storage.start * row_bytes))
            offset += size
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    path = os.path.join(save_directory, TABLE_FILE)
    data_start = 8 + len(encoded)
    if is_main_process:
        _index_tables(save_directory, list(header)[:-1], offset)
        with open(path, "wb") as handle:
            handle.write(len(encoded).to_bytes(8, "little") + encoded)
            handle.truncate(data_start + offset)
    dist.barrier(group=group)
    fd = os.open(path, os.O_WRONLY)
    try:
        for tensor, start in layout:
            rows = tensor.detach()
            for first in range(0, rows.shape[0], WRITE_CHUNK_ROWS):
                chunk = rows[first : first + WRITE_CHUNK_ROWS].cpu().contiguous().view(torch.uint8)
                os.pwrite(fd, chunk.numpy().data, data_start + start + first * chunk[0].numel())
        os.fsync(fd)
    finally:
        os.close(fd)
    dist.barrier(group=group)


def _index_tables(save_directory: str, table_keys: list[str], table_bytes: int) -> None:
    """Point the checkpoint's index (made from a single-file save when there is none) at TABLE_FILE's tensors."""
    index_path = os.path.join(save_directory, INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path) as handle:
            index = json.load(handle)
    else:
        single = os.path.join(save_directory, "model.safetensors")
        os.replace(single, os.path.join(save_directory, BACKBONE_FILE))
        entries = safetensors_index(os.path.join(save_directory, BACKBONE_FILE))
        index = {"metadata": {"total_size": sum(end - start for _, _, start, end in entries.values())},
                 "weight_map": dict.fromkeys(entries, BACKBONE_FILE)}
    index["metadata"]["total_size"] = index["metadata"].get("total_size", 0) + table_bytes
    index["weight_map"].update(dict.fromkeys(table_keys, TABLE_FILE))
    with open(index_path, "w") as handle:
        json.dump(index, handle, indent=2, sort_keys=True)


__all__ = [
    "RowShardedStorage", "check_same_engram_config", "owner_lookup", "row_blocks", "save_table_shards",
    "shard_engram_tables", "sharded_tables",
]
