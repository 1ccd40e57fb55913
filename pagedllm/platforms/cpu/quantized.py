"""GGUF-quantized weights on CPU (csrc/quantized_gemm.c): the matmul and the
embedding lookup of layers holding a QuantizedWeight (layers/quantization.py).

The 32-value block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) run on gguf_gemm_int8
(csrc/quantized_dot.c) for any number of rows: the activations rounded to int8 per
block as llama.cpp does, integer dot products, weight tiles unpacked once per call
and taken through every row. One kernel for every batch size keeps a request's
results independent of the batch it runs in. The K-quants and the LM head (float
activations: logits feed sampling directly) take gguf_gemm for few rows, which
dequantizes tile by tile in L1 and multiplies in float32, and for many rows (prefill,
large batches) dequantized slabs of output rows multiplied by oneDNN: there the
matmul is bound by arithmetic, not bytes. Activations and results are float32; a
16-bit model's are cast on the way in and out.
"""

from __future__ import annotations

import ctypes
import functools
import weakref

import torch

from pagedllm.layers.quantization import QuantizedTensor, QuantizedWeight
from pagedllm.platforms.cpu.kernels import INT64, pointer
from pagedllm.platforms.cpu.linear import float32_linear

# gguf_gemm (float, K-quants and the LM head) up to this many rows, above it dequantized
# slabs + oneDNN: about even near 16 rows on a 2-core Zen 5 EPYC.
QUANTIZED_GEMM_MAX_ROWS = 8
# Values of one dequantized slab (16 MiB of float32): the LM head of a 49k vocabulary is
# 7 slabs of 576-wide rows; an 8B model's 14336 x 4096 down projection 4 of 1024 rows.
SLAB_VALUES = 4 << 20


def _at(tensor: torch.Tensor, offset_bytes: int) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr() + offset_bytes)


class QuantizedKernels:
    def __init__(self, lib: ctypes.CDLL, int8_activations: bool = True) -> None:
        self._lib = lib
        self._int8_activations = int8_activations
        self._dense_linear = float32_linear(None)  # oneDNN's float32 matmul
        # per weight, gguf_gemm_int8's segment arrays (pointers into the weight's blocks: kept
        # only as long as the weight lives)
        self._int8_tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @functools.cached_property
    def float_activations(self) -> QuantizedKernels:
        """The same kernels without int8 activations (the LM head: logits feed sampling directly)."""
        return QuantizedKernels(self._lib, int8_activations=False)

    def dequantize(self, tensor: QuantizedTensor, ids: torch.Tensor | None = None, first_row: int = 0,
                   rows: int | None = None) -> torch.Tensor:
        """Rows [first_row, first_row + rows) of tensor, or the rows given by ids
        (int64 [n]), as float32 [n, cols]."""
        data = tensor.data
        count = len(ids) if ids is not None else (data.shape[0] - first_row if rows is None else rows)
        out = torch.empty(count, tensor.cols, dtype=torch.float32)
        status = self._lib.gguf_dequantize(pointer(out), _at(data, first_row * data.stride(0)), INT64(data.stride(0)),
                                           INT64(tensor.format.ggml_type),
                                           pointer(ids) if ids is not None else None, INT64(count),
                                           INT64(tensor.cols))
        if status != 0:
            raise ValueError(f"gguf_dequantize cannot read a {tensor.format.name} matrix {tuple(tensor.shape)}")
        return out

    def linear(self, x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in] @ weight^T (+ bias) -> [..., weight.out_features], in x's dtype (a padded
        vocabulary's rows that were never loaded give 0)."""
        leading = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).float()
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        bias = bias.float().contiguous() if bias is not None else None
        rows = x2.shape[0]
        y = torch.empty(rows, weight.out_features, dtype=torch.float32)
        if weight.rows < weight.out_features:  # only a padded vocabulary's last rank
            y[:, weight.rows:] = 0
        if self._int8_activations and (table := self.int8_table(weight)):
            self._int8_gemm(y, x2, table, bias)
        else:
            for first, tensor in weight.segments:
                segment_bias = bias[first:first + tensor.shape[0]] if bias is not None else None
                if rows <= QUANTIZED_GEMM_MAX_ROWS:
                    self._gemm(y, first, x2, tensor, segment_bias)
                else:
                    self._slab_gemm(y, first, x2, tensor, segment_bias)
        return y.reshape(*leading, weight.out_features).to(x.dtype)

    def int8_table(self, weight: QuantizedWeight) -> tuple | None:
        """gguf_gemm_int8's segment arrays for weight (made once per weight), or None where a
        segment's format has no integer kernel (the K-quants)."""
        if weight not in self._int8_tables:
            segments = weight.segments
            if any(tensor.format.block_size != 32 for _, tensor in segments):
                self._int8_tables[weight] = None
            else:
                count = len(segments)
                self._int8_tables[weight] = (
                    INT64(count),
                    (ctypes.c_void_p * count)(*(tensor.data.data_ptr() for _, tensor in segments)),
                    (ctypes.c_int64 * count)(*(tensor.data.stride(0) for _, tensor in segments)),
                    (ctypes.c_int64 * count)(*(tensor.format.ggml_type for _, tensor in segments)),
                    (ctypes.c_int64 * count)(*(first for first, _ in segments)),
                    (ctypes.c_int64 * count)(*(tensor.shape[0] for _, tensor in segments)),
                )
        return self._int8_tables[weight]

    def _int8_gemm(self, y: torch.Tensor, x: torch.Tensor, table: tuple, bias: torch.Tensor | None) -> None:
        status = self._lib.gguf_gemm_int8(pointer(y), INT64(y.stride(0)), pointer(x), INT64(x.stride(0)), *table,
                                          pointer(bias) if bias is not None else None, INT64(x.shape[0]),
                                          INT64(x.shape[1]))
        if status != 0:
            raise RuntimeError(f"gguf_gemm_int8 failed ({status}) on a {tuple(y.shape)} output")

    def _gemm(self, y: torch.Tensor, first: int, x: torch.Tensor, tensor: QuantizedTensor,
              bias: torch.Tensor | None) -> None:
        data = tensor.data
        status = self._lib.gguf_gemm(
            _at(y, first * y.element_size()), INT64(y.stride(0)), pointer(x), INT64(x.stride(0)), pointer(data),
            INT64(data.stride(0)), INT64(tensor.format.ggml_type), pointer(bias) if bias is not None else None,
            INT64(x.shape[0]), INT64(tensor.cols), INT64(data.shape[0]))
        if status != 0:
            raise RuntimeError(f"gguf_gemm failed ({status}) on a {tensor.format.name} matrix {tuple(tensor.shape)}")

    def _slab_gemm(self, y: torch.Tensor, first: int, x: torch.Tensor, tensor: QuantizedTensor,
                   bias: torch.Tensor | None) -> None:
        total = tensor.shape[0]
        slab = max(8, SLAB_VALUES // tensor.cols)
        for start in range(0, total, slab):
            count = min(slab, total - start)
            dense = self.dequantize(tensor, first_row=start, rows=count)
            part = self._dense_linear(x, dense, bias[start:start + count] if bias is not None else None)
            y[:, first + start:first + start + count] = part

    def embedding(self, ids: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
        """ids [...] -> [..., in_features] in the model's dtype (one segment: an embedding is one tensor)."""
        (_, tensor), = weight.segments
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        return self.dequantize(tensor, flat).reshape(*ids.shape, tensor.cols).to(weight.dtype)
