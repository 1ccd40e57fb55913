"""Python side of csrc/fused_ops.c (RMSNorm fused with the residual add, SiLU-and-mul,
rotary embedding; float32 and bfloat16) and csrc/small_gemm.c (linear layers for a
few rows; float32).

A layer takes a FusedOps for its dtype once, when it is built (CpuPlatform.fused_ops).
Each method returns None (or False) when its kernel cannot take these tensors (another
dtype than the one bound, a layout it does not take); the caller then evaluates its
PyTorch expression, which stays the tested reference.
"""

from __future__ import annotations

import ctypes

import torch

from pagedllm.platforms.cpu.kernels import FLOAT, INT64, pointer

# The storage types the fused kernels are built for -> their names' suffix.
SUFFIXES = {torch.float32: "f32", torch.bfloat16: "bf16"}


class FusedOps:
    """The fused kernels of one storage dtype."""

    def __init__(self, lib: ctypes.CDLL, dtype: torch.dtype) -> None:
        self.dtype = dtype
        suffix = SUFFIXES[dtype]
        self._rms_norm = getattr(lib, f"rms_norm_{suffix}")
        self._add_rms_norm = getattr(lib, f"add_rms_norm_{suffix}")
        self._silu_and_mul = getattr(lib, f"silu_and_mul_{suffix}")
        self._rotary = getattr(lib, f"rotary_{suffix}")

    def _takes(self, *tensors: torch.Tensor) -> bool:
        return all(t.dtype == self.dtype and t.device.type == "cpu" for t in tensors)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float) -> torch.Tensor | None:
        """x [..., dim] -> x / rms(x) * (weight + offset), a new tensor."""
        if not self._takes(x, weight) or not x.is_contiguous():
            return None
        out = torch.empty_like(x)
        dim = x.shape[-1]
        self._rms_norm(pointer(out), pointer(x), pointer(weight), INT64(x.numel() // dim), INT64(dim), FLOAT(eps),
                       FLOAT(weight_offset))
        return out

    def add_rms_norm_(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                      weight_offset: float) -> bool:
        """In place: residual += x, x = rms_norm(residual). x, residual [tokens, dim]."""
        if (not self._takes(x, residual, weight) or not (x.is_contiguous() and residual.is_contiguous())
                or x.shape != residual.shape):
            return False
        dim = x.shape[-1]
        self._add_rms_norm(pointer(x), pointer(residual), pointer(weight), INT64(x.numel() // dim), INT64(dim),
                           FLOAT(eps), FLOAT(weight_offset))
        return True

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [tokens, 2d] (gate | up) -> silu(gate) * up [tokens, d]."""
        if not self._takes(x) or not x.is_contiguous() or x.dim() != 2:
            return None
        d = x.shape[1] // 2
        out = torch.empty(x.shape[0], d, dtype=x.dtype)
        self._silu_and_mul(pointer(out), pointer(x), INT64(x.shape[0]), INT64(d))
        return out

    def rotary_(self, query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
                sin_cache: torch.Tensor) -> bool:
        """Rotate query [tokens, heads, head_dim] and key [tokens, kv_heads, head_dim] in
        place (their first rotary_dim = cos_cache.shape[1] features); either may be a
        column slice of a wider matrix. cos/sin caches: float32. Both or neither are rotated."""
        if (not self._takes(query, key) or cos_cache.dtype != torch.float32 or sin_cache.dtype != torch.float32
                or positions.dtype != torch.int64 or positions.device.type != "cpu"
                or not (positions.is_contiguous() and cos_cache.is_contiguous() and sin_cache.is_contiguous())
                or any(x.stride(2) != 1 or x.stride(1) != x.shape[2] for x in (query, key))):
            return False
        for x in (query, key):
            self._rotary(pointer(x), INT64(x.stride(0)), INT64(x.shape[0]), INT64(x.shape[1]), INT64(x.shape[2]),
                         INT64(cos_cache.shape[1]), pointer(positions), pointer(cos_cache), pointer(sin_cache))
        return True


def small_linear(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor | None:
    """x [rows, in] @ weight [out, in]^T (+ bias [out]) -> [rows, out], float32, for small row counts."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if (any(t.dtype != torch.float32 for t in tensors) or x.dim() != 2 or x.stride(1) != 1
            or not weight.is_contiguous() or (bias is not None and not bias.is_contiguous())):
        return None
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    lib.small_gemm_f32(pointer(out), pointer(x), INT64(x.stride(0)), pointer(weight),
                       pointer(bias) if bias is not None else None, INT64(x.shape[0]), INT64(x.shape[1]),
                       INT64(weight.shape[0]))
    return out
