"""Linear layers with Megatron-style tensor-parallel sharding.

Each parameter carries a `weight_loader(param, loaded_weight, shard_id=None)`
that copies only this rank's slice of a full checkpoint tensor, so fused
layers (QKV, gate/up) load from the separate tensors checkpoints store.
Weights are [out_features, in_features] as in torch.nn.Linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pagedllm.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_reduce
from pagedllm.layers.quantization import place_rows
from pagedllm.platforms import current_platform


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


@dataclass(frozen=True)
class HeadShard:
    """One rank's attention heads: query heads [q_start, q_start + num_heads) and
    KV heads [kv_start, kv_start + num_kv_heads)."""

    q_start: int
    num_heads: int
    kv_start: int
    num_kv_heads: int


def shard_attention_heads(num_heads: int, num_kv_heads: int, tp_size: int, tp_rank: int) -> HeadShard:
    """Query heads stay on the rank of the KV head they read, so ranks take whole KV
    groups: as evenly as the count allows when there are at least as many KV heads as
    ranks (9 query / 3 KV heads on 2 ranks: 3/1 and 6/2), else every KV head is
    replicated on tp_size / num_kv_heads ranks, which split its query heads."""
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group evenly over {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    if num_kv_heads >= tp_size:
        kv_start, kv_end = tp_rank * num_kv_heads // tp_size, (tp_rank + 1) * num_kv_heads // tp_size
        return HeadShard(kv_start * group, (kv_end - kv_start) * group, kv_start, kv_end - kv_start)
    replicas = divide(tp_size, num_kv_heads)
    heads_per_rank = divide(num_heads, tp_size)
    return HeadShard(tp_rank * heads_per_rank, heads_per_rank, tp_rank // replicas, 1)


def linear_method():
    """x [T, in], weight [out, in], bias -> [T, out], as F.linear: the current platform's
    fastest for the dtype the model is being built in (asked once per layer)."""
    return current_platform().linear(torch.get_default_dtype())


def _param(shape: tuple[int, ...], loader) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape), requires_grad=False)
    param.weight_loader = loader
    return param


def _copy_checked(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"{name}: checkpoint tensor has shape {tuple(loaded.shape)}, "
                         f"expected {tuple(param.shape)}")
    param.data.copy_(loaded)


class LinearBase(nn.Module):
    """weight [out, in] (a float parameter, or a QuantizedWeight once quantized rows
    were loaded: layers/quantization.py), bias [out] or None, self.linear the matmul."""

    def _load_rows(self, param: nn.Parameter, first_row: int, rows: int, loaded: torch.Tensor, name: str) -> None:
        """Output rows [first_row, first_row + rows) of the weight or bias come from loaded."""
        if param.dim() == 1:  # a bias: always float
            _copy_checked(param.data.narrow(0, first_row, rows), loaded, name)
        else:
            place_rows(self, param, first_row, rows, loaded, name)

    def use_quantized(self, kernels) -> None:
        self.linear = kernels.linear


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = _param((out_features, in_features), self.weight_loader)
        self.bias = _param((out_features,), self.weight_loader) if bias else None
        self.linear = linear_method()

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        self._load_rows(param, 0, param.shape[0], loaded, type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.weight, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks: rank r computes rows [r*n, (r+1)*n).
    out_per_rank overrides n for subclasses whose split is not even."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 out_per_rank: int | None = None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.out_per_rank = divide(out_features, self.tp_size) if out_per_rank is None else out_per_rank
        self.weight = _param((self.out_per_rank, in_features), self.weight_loader)
        self.bias = _param((self.out_per_rank,), self.weight_loader) if bias else None
        self.linear = linear_method()

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        size = param.shape[0]
        self._load_rows(param, 0, size, loaded.narrow(0, self.tp_rank * size, size), type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate and up projections).
    shard_id = index into output_sizes."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:  # an already fused checkpoint tensor
            return super().weight_loader(param, loaded)
        shard = divide(self.output_sizes[shard_id], self.tp_size)
        offset = sum(divide(size, self.tp_size) for size in self.output_sizes[:shard_id])
        self._load_rows(param, offset, shard, loaded.narrow(0, self.tp_rank * shard, shard),
                        f"{type(self).__name__}[{shard_id}]")


class QKVParallelLinear(ColumnParallelLinear):
    """Fused Q, K, V projections of this rank's heads (see shard_attention_heads)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False) -> None:
        self.head_dim = head_dim
        self.heads = shard_attention_heads(num_heads, num_kv_heads, get_tp_size(), get_tp_rank())
        self.num_heads, self.num_kv_heads = self.heads.num_heads, self.heads.num_kv_heads
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias,
                         out_per_rank=(self.num_heads + 2 * self.num_kv_heads) * head_dim)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:
            raise ValueError("QKVParallelLinear loads q, k and v separately (shard_id 'q' | 'k' | 'v')")
        if shard_id == "q":
            offset, size, start = 0, self.q_size, self.heads.q_start * self.head_dim
        else:
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            size, start = self.kv_size, self.heads.kv_start * self.head_dim
        self._load_rows(param, offset, size, loaded.narrow(0, start, size), f"{type(self).__name__}[{shard_id}]")


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed (one all-reduce).
    input_shard = (start, size) of this rank's input features when the split is not
    even (the attention output of a rank's heads)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 input_shard: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        if input_shard is None:
            size = divide(in_features, self.tp_size)
            input_shard = (self.tp_rank * size, size)
        self.in_start, self.in_per_rank = input_shard
        self.weight = _param((out_features, self.in_per_rank), self.weight_loader)
        self.bias = _param((out_features,), self._bias_loader) if bias else None
        self.linear = linear_method()

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        self._load_rows(param, 0, param.shape[0], loaded.narrow(1, self.in_start, self.in_per_rank),
                        type(self).__name__)

    def _bias_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        _copy_checked(param, loaded, type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = tp_all_reduce(self.linear(x, self.weight))
        # The bias is added once, after the sum.
        return out if self.bias is None else out + self.bias
