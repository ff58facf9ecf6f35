"""Engram memory tables: all heads of all orders of one layer in one flat table, with per-head row offsets."""

import torch
from torch import nn
from torch.nn import functional as F


class EngramTable(nn.Embedding):
    """One layer's flat table `weight` [sum of head table sizes, head_dim].

    `forward(hash_ids [B, T, heads]) -> rows [B, T, heads * head_dim]`: head j reads row `offsets[j] + hash_ids[..., j]`.
    An `nn.Embedding`, so `sparse = True` gives the weight sparse gradients over the gathered rows only, and
    DistributedDataParallel, which recognises embeddings by type, all-reduces them sparsely (see `training.py`).
    """

    def __init__(self, table_sizes: list[int], head_dim: int):
        rows = sum(table_sizes)
        super().__init__(rows, head_dim, _weight=torch.empty(rows, head_dim))  # initialised by _init_weights
        self.table_sizes = list(table_sizes)
        self.head_dim = head_dim
        self.offsets = nn.Buffer(self.head_offsets(), persistent=False)

    def head_offsets(self) -> torch.Tensor:
        sizes = torch.tensor(self.table_sizes, dtype=torch.long)
        return torch.cumsum(sizes, 0) - sizes

    def forward(self, hash_ids: torch.LongTensor) -> torch.Tensor:
        rows = F.embedding(hash_ids + self.offsets, self.weight, sparse=self.sparse)
        return rows.flatten(-2)

    def extra_repr(self) -> str:
        return f"heads={len(self.table_sizes)}, rows={self.weight.shape[0]}, head_dim={self.head_dim}"


__all__ = ["EngramTable"]
