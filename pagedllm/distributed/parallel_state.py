"""The tensor-parallel group of this process.

Layers ask for their rank and the group size here; with one process (the
default) every collective is the identity, so the same layers run unsharded.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_tp_rank = 0
_tp_size = 1


def set_tensor_parallel_group(rank: int, world_size: int) -> None:
    """Record this process's place in the (already initialized) default group."""
    global _tp_rank, _tp_size
    _tp_rank, _tp_size = rank, world_size


def get_tp_rank() -> int:
    return _tp_rank


def get_tp_size() -> int:
    return _tp_size


def tp_all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (row-parallel outputs), in place."""
    if _tp_size > 1:
        dist.all_reduce(tensor)
    return tensor


def tp_all_gather(tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's shard along `dim` (vocab-parallel logits)."""
    if _tp_size == 1:
        return tensor
    shards = [torch.empty_like(tensor) for _ in range(_tp_size)]
    dist.all_gather(shards, tensor.contiguous())
    return torch.cat(shards, dim=dim)
