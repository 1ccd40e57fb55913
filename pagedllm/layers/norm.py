"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.platforms import current_platform


class RMSNorm(nn.Module):
    """y = x / rms(x) * (weight + offset), computed in float32.
    offset = 1 for Gemma, whose checkpoints store weight - 1."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, weight_offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.weight_offset = weight_offset
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.fused = current_platform().fused_ops(self.weight.dtype)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight.float() + self.weight_offset if self.weight_offset else self.weight.float()
        return (x32 * weight).to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """With `residual`: returns (norm(x + residual), x + residual) — the sum is
        the next residual, so the add happens once. On CPU in float32 one fused
        kernel does it in place (x and residual are this step's own activations)."""
        if residual is None:
            out = self.fused.rms_norm(x, self.weight, self.eps, self.weight_offset) if self.fused else None
            return out if out is not None else self._norm(x)
        if self.fused and self.fused.add_rms_norm_(x, residual, self.weight, self.eps, self.weight_offset):
            return x, residual
        summed = x + residual
        return self._norm(summed), summed
