"""Row-owner sharding of Engram tables over torch.distributed ranks (issue 12, first piece: the lookup).

Rank r owns the contiguous rows `[starts[r], starts[r + 1])` of a table (`row_blocks`; uneven splits allowed) and
only those rows. A lookup deduplicates the batch's row ids, sends each id to its owner (`all_to_all`), the owner
gathers its rows, and the rows come back (`all_to_all`). Backward routes each row's gradient to its owner the same
way; the owner sums them into a sparse gradient of its shard, which the lazy Adam of `training.py` updates row by
row. Every exchange is proportional to the batch's unique rows, never to the table. NCCL and gloo both have
`all_to_all_single`; no sparse all-reduce is needed.
"""

import torch
import torch.distributed as dist
from torch import nn


def row_blocks(rows: int, world_size: int) -> list[int]:
    """Start row of every rank's block, plus `rows` at the end: the first `rows % world_size` ranks own one more."""
    if rows < world_size:
        raise ValueError(f"a table of {rows} rows cannot be sharded over {world_size} ranks: every rank needs a row.")
    base, extra = divmod(rows, world_size)
    starts = [0]
    for rank in range(world_size):
        starts.append(starts[-1] + base + (rank < extra))
    return starts


def _exchange(tensor: torch.Tensor, send_counts: list[int], receive_counts: list[int], group) -> torch.Tensor:
    """`all_to_all_single` of the rows of `tensor` [sum(send_counts), ...] -> [sum(receive_counts), ...]."""
    out = tensor.new_empty((sum(receive_counts), *tensor.shape[1:]))
    dist.all_to_all_single(out, tensor.contiguous(), receive_counts, send_counts, group=group)
    return out


class _OwnerLookup(torch.autograd.Function):
    """rows [U, D] of sorted unique global ids [U], from the shards of all ranks; backward: sparse shard gradient."""

    @staticmethod
    def forward(ctx, shard, ids, starts, group):
        world = dist.get_world_size(group)
        owners = torch.searchsorted(starts[1:-1], ids, right=True)  # ids are sorted, so owners are too
        send_counts = torch.bincount(owners, minlength=world)
        receive_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(receive_counts, send_counts, group=group)
        send_counts, receive_counts = send_counts.tolist(), receive_counts.tolist()
        requested = _exchange(ids, send_counts, receive_counts, group)  # ids other ranks ask this rank for
        local = requested - starts[dist.get_rank(group)]
        rows = _exchange(shard.detach()[local], receive_counts, send_counts, group)
        ctx.save_for_backward(local)
        ctx.counts, ctx.group, ctx.shard_shape = (send_counts, receive_counts), group, shard.shape
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        (local,) = ctx.saved_tensors
        send_counts, receive_counts = ctx.counts
        grads = _exchange(grad_rows, send_counts, receive_counts, ctx.group)  # to the owners, in request order
        grad_shard = torch.sparse_coo_tensor(local[None], grads, ctx.shard_shape).coalesce()
        return grad_shard, None, None, None


def owner_lookup(shard: nn.Parameter, ids: torch.LongTensor, starts: torch.LongTensor, group=None) -> torch.Tensor:
    """Rows `[U, D]` of the sorted unique global row ids `ids` [U] (each rank passes its own), where this rank holds
    `shard` = rows `[starts[rank], starts[rank + 1])`. Collective: every rank of `group` must call it."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("owner_lookup shards tables over torch.distributed: initialise a process group first "
                           "(torchrun / accelerate launch, then torch.distributed.init_process_group).")
    return _OwnerLookup.apply(shard, ids, starts.to(ids.device), group)


__all__ = ["owner_lookup", "row_blocks"]
