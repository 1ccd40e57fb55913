"""Gated MLP activations on a fused [.., 2*d] gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.platforms import current_platform


class SiluAndMul(nn.Module):
    """x: [..., 2*d] = [gate | up] -> silu(gate) * up: [..., d]."""

    def __init__(self) -> None:
        super().__init__()
        self.fused = current_platform().fused_ops(torch.get_default_dtype())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fused.silu_and_mul(x) if self.fused else None
        if out is not None:
            return out
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluAndMul(nn.Module):
    """GeGLU (Gemma): gelu(gate) * up with the tanh approximation by default."""

    def __init__(self, approximate: str = "tanh") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate=self.approximate) * up
