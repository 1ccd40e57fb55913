"""ALiBi (Press et al., "Train Short, Test Long", 2022): attention position bias
m_h * (key position - query position) instead of rotary embeddings."""

from __future__ import annotations

import math

import torch

from pagedllm.layers.linear import HeadShard


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The paper's per-head slopes m_h, float32 [num_heads].

    For n a power of two: the geometric sequence starting at 2^(-8/n) with that
    ratio. Otherwise the slopes of the closest smaller power of two p, then every
    other slope of 2p until there are n.
    """
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** i for i in range(1, closest + 1)]
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        num_extra = num_heads - closest
        slopes += [extra_base ** i for i in range(1, 1 + 2 * num_extra, 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def local_alibi_slopes(num_heads: int, heads: HeadShard) -> torch.Tensor:
    """The slopes of this tensor-parallel rank's query heads."""
    return alibi_slopes(num_heads)[heads.q_start:heads.q_start + heads.num_heads]
