"""Training with row-sharded Engram tables (`table_parallel.py`): what a training run needs beyond running a model.

- `shard_engram_model`: the tables by rows, and the rest of the model with FSDP2 (`fully_shard`), the row shards
  left out of it (`ignored_params`): a backbone larger than one device trains beside tables larger than one host;
- `clip_grad_norm_`: the gradient norm over all of a model's gradients: FSDP's DTensor shards, replicated gradients,
  and the table shards of every rank;
- a global optimizer step pre-hook that refuses an optimizer built before sharding (it holds the parameters that
  sharding replaced): registered when this package is imported, never by an exported model;
- `count_exchanged_bytes`: the bytes each rank sends to the others through the table exchanges, for benchmarks.

Checkpoints of such runs, which load onto any number of ranks, are in `distributed_checkpoint.py`. A module of the
package, not of a model: the `trust_remote_code` files never import it.
"""

import contextlib
import weakref

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .table_parallel import shard_engram_tables, sharded_tables


def shard_engram_model(
    model: nn.Module,
    fsdp: bool = True,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard `model` over all ranks for training, in place: every Engram table by rows (`shard_engram_tables`, unless
    it was loaded sharded with `engram_table_parallel=True`), and with `fsdp` the rest with FSDP2: `fully_shard` on
    every decoder block (`_no_split_modules`), then on the root, the table shards in `ignored_params`.

    The tables keep their own exchange and lazy sparse Adam (a step costs the rows it touched, where FSDP would
    all-gather a whole table per forward and step it densely); everything else is split 1/W per rank. `mp_policy` is
    FSDP2's `MixedPrecisionPolicy` for the backbone (e.g. `param_dtype=torch.bfloat16, reduce_dtype=torch.float32`);
    table rows keep their stored dtype. Call it on every rank before building the optimizer. Activation
    checkpointing (`model.gradient_checkpointing_enable()`) composes. Returns `model` (an `FSDPModule` with `fsdp`).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("shard_engram_model takes the model itself, not a DistributedDataParallel wrapper.")
    if isinstance(model, FSDPModule):
        raise ValueError("shard_engram_model: this model is sharded by FSDP already.")
    if any(param.is_meta for param in model.parameters()):
        raise ValueError("shard_engram_model: the model has parameters on the meta device; load its weights on every "
                         "rank first (from_pretrained without low-memory FSDP loading).")
    if not sharded_tables(model):
        shard_engram_tables(model)
    if not fsdp:
        return model
    shards = {table.weight for table in sharded_tables(model).values()}
    check_same_backbone(model, shards)
    for param in model.parameters():  # fully_shard replaces these by DTensor parameters: an optimizer built on
        if param not in shards:  # them would step copies the model no longer reads
            param._engram_sharded_away = True
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    options = dict(ignored_params=shards, mp_policy=mp_policy or MixedPrecisionPolicy(),
                   reshard_after_forward=reshard_after_forward)
    for module in [m for m in model.modules() if type(m).__name__ in block_names]:
        fully_shard(module, **options)
    return fully_shard(model, **options)


@torch.no_grad()
def check_same_backbone(model: nn.Module, skip: set) -> None:
    """Raise on every rank unless every rank holds the same parameters (those not in `skip`), compared by a float64 sum
    per parameter: FSDP2 keeps each rank's own slice of what it holds, so a rank that loaded other weights (or none:
    accelerate's cpu_ram_efficient_loading expects to broadcast the first rank's, which it does not do for a model
    sharded before it prepares it) would train a mixture silently."""
    names = [name for name, param in model.named_parameters() if param not in skip]
    sums = torch.stack([param.detach().sum(dtype=torch.float64) for param in model.parameters() if param not in skip])
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sums.cpu())
    for rank, theirs in enumerate(everyone):
        differing = (theirs != everyone[0]) & ~(theirs.isnan() & everyone[0].isnan())
        if differing.any():
            raise ValueError(
                f"rank {rank} holds other weights than rank 0 ({names[int(differing.nonzero()[0])]}, ...): FSDP2 needs "
                "every rank to load the same model before it shards it (with accelerate, turn "
                "fsdp_cpu_ram_efficient_loading off)."
            )


def _norm(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The norm of `grads`: DTensors (FSDP's shards) reduced over their mesh, plain tensors this rank's own."""
    sharded = [g for g in grads if isinstance(g, DTensor)]
    norm = torch.nn.utils.get_total_norm([g for g in grads if not isinstance(g, DTensor)], norm_type)
    if sharded:
        dtensor_norm = torch.nn.utils.get_total_norm(sharded, norm_type).full_tensor()
        norm = torch.linalg.vector_norm(torch.stack([norm, dtensor_norm.to(norm.device)]), norm_type)
    return norm


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over all of `model`'s gradients, table shards of every rank included.

    Call it after backward (and DDP's all-reduce): replicated gradients count once, FSDP's DTensor gradients are
    reduced over their mesh, and the table shards' norms are all-reduced over their group. Every rank gets the same
    total norm and clips by it. Returns the total norm.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    tables = list(sharded_tables(model).values())
    shard_ids = {id(table.weight) for table in tables}
    rest = _norm([p.grad for p in params if id(p) not in shard_ids], norm_type)
    local = torch.nn.utils.get_total_norm([p.grad for p in params if id(p) in shard_ids], norm_type)
    if tables:
        group = tables[0].storage.group
        local = local.to(local.device if dist.get_backend(group) != "nccl" else torch.device("cuda"))
        if norm_type == float("inf"):
            dist.all_reduce(local, dist.ReduceOp.MAX, group=group)
        else:
            local = local.pow(norm_type)
            dist.all_reduce(local, group=group)
            local = local.pow(1.0 / norm_type)
    total = torch.linalg.vector_norm(torch.stack([rest, local.to(rest.device)]), norm_type)
    for dtensors in (True, False):  # a foreach kernel takes DTensors or plain tensors, not both in one list
        torch.nn.utils.clip_grads_with_norm_([p for p in params if isinstance(p.grad, DTensor) == dtensors],
                                             max_norm, total)
    return total


_stale_checked = weakref.WeakSet()


def refuse_stale_parameters(optimizer, args, kwargs) -> None:
    """Global optimizer step pre-hook: an optimizer built before sharding holds parameters that sharding replaced."""
    if optimizer in _stale_checked:
        return
    for group in optimizer.param_groups:
        if any(getattr(param, "_engram_sharded_away", False) for param in group["params"]):
            raise ValueError(
                "this optimizer was built before the model was sharded (shard_engram_tables / shard_engram_model): "
                "it holds parameters that sharding replaced (whole Engram tables by per-rank row shards, the rest by "
                "FSDP's DTensor shards), so its steps would change copies the model no longer reads. Build the "
                "optimizer after sharding (create_engram_optimizer, or EngramTrainer, which does it in that order)."
            )
    _stale_checked.add(optimizer)


register_optimizer_step_pre_hook(refuse_stale_parameters)


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


__all__ = ["clip_grad_norm_", "count_exchanged_bytes", "shard_engram_model"]
