"""Training with row-sharded Engram tables (`table_parallel.py`): what a training run needs beyond running a model.

- `clip_grad_norm_`: the gradient norm over all of a model's gradients, table shards of every rank included;
- `load_into_shards`: resume a sharded run from a saved folder, each rank reading its own rows;
- a global optimizer step pre-hook that refuses an optimizer built before `shard_engram_tables` (it holds the whole
  tables, which sharding replaced): registered when this package is imported, never by an exported model;
- `count_exchanged_bytes`: the bytes each rank sends to the others through the table exchanges, for benchmarks.

A module of the package, not of a model: the `trust_remote_code` files never import it.
"""

import contextlib
import json
import os
import weakref

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .memory import CheckpointTables
from .table_parallel import INDEX_FILE, sharded_tables


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over all of `model`'s gradients, table shards of every rank included.

    Call it after backward (and DDP's all-reduce): the replicated gradients count once, the shards' norms are
    all-reduced over their group. Every rank gets the same total norm and clips by it. Returns the total norm.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    tables = list(sharded_tables(model).values())
    shard_ids = {id(table.weight) for table in tables}
    replicated = torch.nn.utils.get_total_norm([p.grad for p in params if id(p) not in shard_ids], norm_type)
    local = torch.nn.utils.get_total_norm([p.grad for p in params if id(p) in shard_ids], norm_type)
    device = replicated.device
    if tables:
        group = tables[0].storage.group
        exchange_device = local.device if dist.get_backend(group) != "nccl" else torch.device("cuda")
        local = local.to(exchange_device)
        if norm_type == float("inf"):
            dist.all_reduce(local, dist.ReduceOp.MAX, group=group)
        else:
            local = local.pow(norm_type)
            dist.all_reduce(local, group=group)
            local = local.pow(1.0 / norm_type)
    parts = torch.stack([replicated, local.to(device)])
    total = parts.max() if norm_type == float("inf") else torch.linalg.vector_norm(parts, norm_type)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def checkpoint_files(folder: str) -> list[str]:
    """The safetensors files of a saved model folder: those its index names, or its one model.safetensors."""
    index = os.path.join(folder, INDEX_FILE)
    if not os.path.exists(index):
        return [os.path.join(folder, "model.safetensors")]
    with open(index) as handle:
        return sorted({os.path.join(folder, name) for name in json.load(handle)["weight_map"].values()})


@torch.no_grad()
def load_into_shards(model: nn.Module, folder: str) -> None:
    """Load a saved model folder into `model`, whose tables are sharded: everything else whole, and each table's
    own rows only (read from the memory-mapped files). What `EngramTrainer` resumes a sharded run with."""
    from safetensors import safe_open

    files = checkpoint_files(folder)
    tables = sharded_tables(model)
    state = {}
    for path in files:
        with safe_open(path, "pt") as handle:
            state.update({key: handle.get_tensor(key) for key in handle.keys() if key.rsplit(".", 1)[0] not in tables})
    missing, unexpected = model.load_state_dict(state, strict=False)
    config = getattr(model, "config", None)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if getattr(config, "tie_word_embeddings", 0) else set()
    missing = [key for key in missing if key.rsplit(".", 1)[0] not in tables and key not in tied]
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not match the model: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}.")
    checkpoint = CheckpointTables(files)
    for name, table in tables.items():
        values, scales = checkpoint.mappings(name, table)
        table.weight.copy_(values.tensor[table.storage.block])
        if scales is not None:
            table.weight_scale.copy_(scales.tensor[table.storage.block])


_stale_checked = weakref.WeakSet()


def refuse_stale_tables(optimizer, args, kwargs) -> None:
    """Global optimizer step pre-hook: an optimizer built before sharding holds the whole tables, now emptied."""
    if optimizer in _stale_checked:
        return
    for group in optimizer.param_groups:
        if any(getattr(param, "_engram_sharded_away", False) for param in group["params"]):
            raise ValueError(
                "this optimizer was built before shard_engram_tables(): it holds the whole Engram tables, which "
                "sharding replaced by per-rank shards. Build the optimizer after sharding (create_engram_optimizer, "
                "or EngramTrainer(shard_tables=True), which does it in that order)."
            )
    _stale_checked.add(optimizer)


register_optimizer_step_pre_hook(refuse_stale_tables)


@contextlib.contextmanager
def count_exchanged_bytes():
    """Count the bytes this process sends to other ranks through `all_to_all_single` (the table exchanges: counts,
    ids, rows, row gradients) while the block runs; yields a dict whose "sent" grows."""
    counted = {"sent": 0}
    original = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        row_bytes = input[:1].numel() * input.element_size() if input.dim() > 1 else input.element_size()
        splits = input_split_sizes or [input.shape[0] // world] * world
        counted["sent"] += (sum(splits) - splits[rank]) * row_bytes
        return original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counting  # table_parallel calls it through the torch.distributed module
    try:
        yield counted
    finally:
        dist.all_to_all_single = original


__all__ = ["clip_grad_norm_", "count_exchanged_bytes", "load_into_shards"]
