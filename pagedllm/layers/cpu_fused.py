"""Python side of cpu_fused_ops.c (fused RMSNorm with the residual add, SiLU-and-mul,
rotary embedding) and cpu_small_gemm.c (linear layers for a few rows), float32 on CPU.

Each function returns None (or False) when its kernel cannot run here (another
dtype or device, a layout it does not take, no C compiler); the caller then
evaluates its PyTorch expression, which stays the tested reference.
"""

from __future__ import annotations

import ctypes

import torch

from pagedllm.cpu_kernels import FLOAT, INT64, load_kernel_library, pointer


def _library(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    if all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors):
        return load_kernel_library()
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float) -> torch.Tensor | None:
    """x [..., dim] -> x / rms(x) * (weight + offset), a new tensor."""
    lib = _library(x, weight)
    if lib is None or not x.is_contiguous():
        return None
    out = torch.empty_like(x)
    dim = x.shape[-1]
    lib.rms_norm_f32(pointer(out), pointer(x), pointer(weight), INT64(x.numel() // dim), INT64(dim), FLOAT(eps),
                     FLOAT(weight_offset))
    return out


def add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                  weight_offset: float) -> bool:
    """In place: residual += x, x = rms_norm(residual). x, residual [tokens, dim]."""
    lib = _library(x, residual, weight)
    if lib is None or not (x.is_contiguous() and residual.is_contiguous()) or x.shape != residual.shape:
        return False
    dim = x.shape[-1]
    lib.add_rms_norm_f32(pointer(x), pointer(residual), pointer(weight), INT64(x.numel() // dim), INT64(dim),
                         FLOAT(eps), FLOAT(weight_offset))
    return True


def silu_and_mul(x: torch.Tensor) -> torch.Tensor | None:
    """x [tokens, 2d] (gate | up) -> silu(gate) * up [tokens, d]."""
    lib = _library(x)
    if lib is None or not x.is_contiguous() or x.dim() != 2:
        return None
    d = x.shape[1] // 2
    out = torch.empty(x.shape[0], d, dtype=x.dtype)
    lib.silu_and_mul_f32(pointer(out), pointer(x), INT64(x.shape[0]), INT64(d))
    return out


def rotary_(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
            sin_cache: torch.Tensor) -> bool:
    """Rotate query [tokens, heads, head_dim] and key [tokens, kv_heads, head_dim] in
    place (their first rotary_dim = cos_cache.shape[1] features); either may be a
    column slice of a wider matrix. Both or neither are rotated."""
    lib = _library(query, key, cos_cache, sin_cache)
    if (lib is None or positions.dtype != torch.int64 or positions.device.type != "cpu"
            or not (positions.is_contiguous() and cos_cache.is_contiguous() and sin_cache.is_contiguous())
            or any(x.stride(2) != 1 or x.stride(1) != x.shape[2] for x in (query, key))):
        return False
    for x in (query, key):
        lib.rotary_f32(pointer(x), INT64(x.stride(0)), INT64(x.shape[0]), INT64(x.shape[1]), INT64(x.shape[2]),
                       INT64(cos_cache.shape[1]), pointer(positions), pointer(cos_cache), pointer(sin_cache))
    return True


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x [rows, in] @ weight [out, in]^T (+ bias [out]) -> [rows, out], for small row counts."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    lib = _library(*tensors)
    if (lib is None or x.dim() != 2 or x.stride(1) != 1 or not weight.is_contiguous()
            or (bias is not None and not bias.is_contiguous())):
        return None
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    lib.small_gemm_f32(pointer(out), pointer(x), INT64(x.stride(0)), pointer(weight),
                       pointer(bias) if bias is not None else None, INT64(x.shape[0]), INT64(x.shape[1]),
                       INT64(weight.shape[0]))
    return out
