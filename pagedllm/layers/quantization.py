"""Weights kept in llama.cpp's quantized blocks (GGUF), run without a float copy.

With `quantization="gguf"` the GGUF loader hands a layer's weight loader each tensor
of a supported type as a QuantizedTensor: its raw blocks (uint8 [rows, row_bytes], read
from the file) and their format. The layer places it exactly as a
float tensor -- same row offsets for fused QKV / gate-up, same tensor-parallel
slices -- as a segment of a QuantizedWeight. After loading,
finalize_quantized_weights swaps each such layer's float parameter (allocated but
never written, so never backed by memory) for the QuantizedWeight, and its matmul
or lookup for the platform's quantized kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class BlockFormat:
    """A llama.cpp block type: block_size values stored in block_bytes bytes."""

    name: str
    ggml_type: int  # gguf.GGMLQuantizationType
    block_size: int
    block_bytes: int


# The types run quantized (csrc/quantized_gemm.c has their layouts); others are dequantized at load.
GGUF_FORMATS = {fmt.ggml_type: fmt for fmt in (
    BlockFormat("Q4_0", 2, 32, 18),
    BlockFormat("Q4_1", 3, 32, 20),
    BlockFormat("Q5_0", 6, 32, 22),
    BlockFormat("Q5_1", 7, 32, 24),
    BlockFormat("Q8_0", 8, 32, 34),
    BlockFormat("Q4_K", 12, 256, 144),
    BlockFormat("Q5_K", 13, 256, 176),
    BlockFormat("Q6_K", 14, 256, 210),
)}


class QuantizedTensor:
    """A checkpoint matrix [rows, cols] as quantized blocks: data uint8 [rows, row_bytes]."""

    def __init__(self, data: torch.Tensor, fmt: BlockFormat, cols: int) -> None:
        if cols % fmt.block_size or data.shape[1] != cols // fmt.block_size * fmt.block_bytes:
            raise ValueError(f"{fmt.name} rows of {cols} values must be whole {fmt.block_size}-value blocks "
                             f"({cols // fmt.block_size * fmt.block_bytes} bytes), got {data.shape[1]} bytes")
        self.data, self.format, self.cols = data, fmt, cols

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.data.shape[0], self.cols))

    def narrow(self, dim: int, start: int, length: int) -> QuantizedTensor:
        """Rows (dim 0) anywhere; columns (dim 1) only at block boundaries: a tensor-parallel
        split of the input features must fall between blocks."""
        if dim == 0:
            return QuantizedTensor(self.data.narrow(0, start, length), self.format, self.cols)
        size = self.format.block_size
        if start % size or length % size:
            raise ValueError(f"a {self.format.name} weight splits only between its {size}-value blocks; "
                             f"columns [{start}, {start + length}) do not: use a tensor-parallel size that keeps "
                             f"each rank's input features a multiple of {size}, or load without quantization")
        block_bytes = self.format.block_bytes
        return QuantizedTensor(self.data.narrow(1, start // size * block_bytes, length // size * block_bytes),
                               self.format, length)


class QuantizedWeight(nn.Module):
    """A layer's weight [out_features, in_features] as row segments of quantized blocks.

    Fused layers receive their pieces separately, possibly in different formats (a
    Q4_K_M file stores V in another type than Q and K), so each piece stays a segment
    [first_row, first_row + rows) and the kernels take all of them in one call. Segments
    are not concatenated: a merged copy held the layer twice while loading (an 8B Q4_0
    model peaked at 7.0 GiB with merged gate/up and QKV, against its 4.2 GiB file). An
    nn.Module so that it can take a parameter's place."""

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features  # [out, in], as the float weight
        self.dtype = dtype  # the model's: what lookups return
        self.segments: list[tuple[int, QuantizedTensor]] = []

    def place(self, first_row: int, tensor: QuantizedTensor) -> None:
        self.segments.append((first_row, tensor))

    def finalize(self, name: str, padded: bool) -> None:
        """Checks every row is placed once (padded: a vocabulary's padding rows may stay
        missing at the end: the matmul gives them 0) and makes each segment a dense
        matrix (a column slice of a tensor-parallel rank is not)."""
        self.segments.sort(key=lambda segment: segment[0])
        end = 0
        for first, tensor in self.segments:
            if first != end:
                raise ValueError(f"{name}: quantized rows [{min(first, end)}, {max(first, end)}) were "
                                 f"{'never loaded' if first > end else 'loaded twice'}")
            end = first + tensor.shape[0]
        self.segments = [(first, QuantizedTensor(_owned(tensor.data), tensor.format, tensor.cols))
                         for first, tensor in self.segments]
        if not padded and self.rows != self.out_features:
            raise ValueError(f"{name}: quantized rows [{self.rows}, {self.out_features}) were never loaded")

    @property
    def rows(self) -> int:
        """The rows placed (out_features, or fewer for a padded vocabulary's last rank)."""
        first, tensor = self.segments[-1]
        return first + tensor.shape[0]


def _owned(data: torch.Tensor) -> torch.Tensor:
    """data as a dense matrix holding only its own bytes: a tensor-parallel rank's slice is
    copied out of the whole checkpoint tensor, which is then freed."""
    data = data.contiguous()
    return data.clone() if data.untyped_storage().nbytes() != data.nbytes else data


def place_rows(module: nn.Module, param: nn.Parameter, first_row: int, rows: int,
               loaded: torch.Tensor | QuantizedTensor, name: str) -> None:
    """Rows [first_row, first_row + rows) of module's weight param [out, in] come from
    loaded [rows, in]: a float tensor is copied in; a QuantizedTensor becomes a segment
    of module.quantized."""
    if tuple(loaded.shape) != (rows, param.shape[1]):
        raise ValueError(f"{name}: checkpoint tensor has shape {tuple(loaded.shape)}, "
                         f"expected {(rows, param.shape[1])}")
    if isinstance(loaded, QuantizedTensor):
        if getattr(module, "quantized", None) is None:
            module.quantized = QuantizedWeight(param.shape[0], param.shape[1], param.dtype)
        module.quantized.place(first_row, loaded)
    else:
        param.data.narrow(0, first_row, rows).copy_(loaded)


def _replace_weight(module: nn.Module, weight: QuantizedWeight) -> None:
    del module.weight  # the float parameter, never filled (its pages were never touched)
    module.weight = weight


def finalize_quantized_weights(model: nn.Module, kernels) -> None:
    """After loading: layers holding quantized segments run on them (kernels: the
    platform's QuantizedKernels), tied LM heads follow their embedding."""
    owners = [(name, module) for name, module in model.named_modules() if getattr(module, "quantized", None)]
    if owners and kernels is None:
        raise ValueError("quantized GGUF weights need the CPU kernels, which could not be built here "
                         "(see the warning above); load without quantization")
    for name, module in owners:
        weight = module.quantized
        weight.finalize(name, padded=hasattr(module, "vocab_size"))
        del module.quantized
        _replace_weight(module, weight)
        module.use_quantized(kernels)
    for module in model.modules():
        tied_to = getattr(module, "tied_to", None)
        if tied_to is not None and isinstance(tied_to.weight, QuantizedWeight):
            _replace_weight(module, tied_to.weight)
            module.use_quantized(kernels)
