"""Linear layers on CPU: x [T, in] @ weight [out, in]^T (+ bias), by dtype and rows.

float32: up to SMALL_GEMM_MAX_ROWS rows through csrc/small_gemm.c (streams the
weights 1.2-2.7x faster than oneDNN), more through oneDNN: the MKL sgemm behind
F.linear ran 1.2-2.3x slower on these models' wide matrices (LM head 576 -> 49152,
gate/up 576 -> 3072, batches of 16-256 rows, AVX2 EPYC).
bfloat16: oneDNN's bfloat16 matmul (AMX tiles or AVX512-BF16 dot products where the
CPU has them), with the rows padded up to one of a few bucket sizes.

Why buckets: oneDNN compiles (JITs) one kernel per matmul shape and keeps the last
ONEDNN_PRIMITIVE_CACHE_CAPACITY of them. Every batch size is a new shape, so a
server's varying batches recompiled kernels on most steps: 128 batch sizes x 4 of
SmolLM2's shapes in bfloat16 on an AMX Xeon took 1.16 ms a matmul, 0.45 ms padded to
the buckets below (0.44 ms with a cache large enough for all 512 shapes). Padding
costs little: decode-sized matmuls only stream their weights, and a prefill of
2048 tokens is a bucket itself.
"""

from __future__ import annotations

import bisect
import ctypes
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pagedllm.platforms.cpu.fused import small_linear

SMALL_GEMM_MAX_ROWS = 48  # measured: 1.2-2.7x oneDNN up to 48 rows, slower from 64

_ONEDNN_LINEAR = (torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available()
                  and hasattr(torch.ops.mkldnn, "_linear_pointwise") else None)
# Row counts bfloat16 matmuls are padded to (then multiples of the last).
ROW_BUCKETS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
# oneDNN keeps one compiled kernel per matmul shape, and torch's ideep layer above it
# one prepared matmul per shape (LRU_CACHE_CAPACITY): with their default 1024 entries
# each, a server's RSS grew with every new batch size, float32's unpadded row counts
# most (~200 KiB a shape; 1200 random row counts of a 576 x 1536 matmul: +200 MiB,
# flat with 128). 128 holds a model's shapes at every bucket (15 buckets x 5 shapes)
# and float32's last dozen batch sizes. Both are read on first use, so this must run
# before the first matmul.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")
os.environ.setdefault("LRU_CACHE_CAPACITY", "128")


def bucket_rows(rows: int) -> int:
    """The smallest bucket holding `rows`: one of ROW_BUCKETS, else the next multiple of the last."""
    if rows > ROW_BUCKETS[-1]:
        return -(-rows // ROW_BUCKETS[-1]) * ROW_BUCKETS[-1]
    return ROW_BUCKETS[bisect.bisect_left(ROW_BUCKETS, rows)]


def float32_linear(lib: ctypes.CDLL | None) -> Callable:
    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype == torch.float32:
            if lib is not None and x.shape[0] <= SMALL_GEMM_MAX_ROWS:
                out = small_linear(lib, x, weight, bias)
                if out is not None:
                    return out
            if _ONEDNN_LINEAR is not None:
                return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
        return F.linear(x, weight, bias)

    return linear


def onednn_bucketed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """oneDNN's matmul on x [T, in] padded with zero rows to bucket_rows(T); the padded
    rows' outputs are dropped (a row view, no copy). weight: [out, in], dense or packed
    by pack_bfloat16_weights."""
    if _ONEDNN_LINEAR is None:
        return F.linear(x, weight, bias)
    rows = x.shape[0]
    padded_rows = bucket_rows(rows)
    if padded_rows != rows:
        padded = x.new_zeros(padded_rows, x.shape[1])
        padded[:rows] = x
        x = padded
    return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")[:rows]


PACKING_ROWS_HINT = 64  # the batch size oneDNN's packing is chosen for; decode batches are near it


def pack_bfloat16_weights(model: torch.nn.Module) -> None:
    """Replaces the weight of every layer that multiplies through onednn_bucketed_linear
    by oneDNN's packed copy (its blocked layout for AMX / AVX512-BF16 tiles, made once
    here instead of inside every call): decode-sized matmuls of SmolLM2's shapes ran
    1.3-1.6x faster (576 x 3072 at 32 rows: 0.34 -> 0.22 ms; the LM head: 4.7 -> 3.3 ms).
    A tied LM head gets its own packed copy; the embedding keeps the plain weight."""
    if _ONEDNN_LINEAR is None:
        return
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (getattr(module, "linear", None) is onednn_bucketed_linear and isinstance(weight, torch.Tensor)
                and weight.dtype == torch.bfloat16 and weight.layout == torch.strided and weight.dim() == 2):
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKING_ROWS_HINT)
            module.weight = torch.nn.Parameter(packed, requires_grad=False)

