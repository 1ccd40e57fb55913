"""GGUF-quantized weights on CPU (csrc/quantized_gemm.c via platforms/cpu/quantized.py)
against gguf's own numpy dequantization: the dequantized values are exactly gguf's,
and the matmul equals the float32 matmul on those values up to summation order."""

from __future__ import annotations

import ctypes
import os
import platform

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from pagedllm.layers.quantization import GGUF_FORMATS, QuantizedTensor, QuantizedWeight
from pagedllm.platforms.cpu import CpuPlatform, kernels
from pagedllm.platforms.cpu import quantized as cpu_quantized
from pagedllm.platforms.cpu.fused import small_linear

PLATFORM = CpuPlatform()
KERNELS = PLATFORM.quantized_kernels()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="the CPU kernels could not be built (no C compiler)")
FORMATS = sorted(GGUF_FORMATS.values(), key=lambda fmt: fmt.ggml_type)


# Where a K-quant super-block keeps its float16 scales (gguf's writer cannot quantize to them).
K_QUANT_SCALE_OFFSETS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _random_k_blocks(fmt, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes in fmt's layout, with finite float16 scales of a weight's size."""
    blocks = rng.integers(0, 256, (rows, cols // fmt.block_size, fmt.block_bytes), dtype=np.uint8)
    for offset in K_QUANT_SCALE_OFFSETS[fmt.name]:
        scales = rng.uniform(1e-4, 2e-2, (rows, cols // fmt.block_size)).astype(np.float16)
        blocks[..., offset:offset + 2] = scales.view(np.uint8).reshape(*scales.shape, 2)
    return blocks.reshape(rows, -1)


def _quantized(fmt, rows: int, cols: int, seed: int) -> tuple[QuantizedTensor, torch.Tensor]:
    """A random matrix quantized by gguf's writer (K-quants: random blocks), and gguf's
    dequantization of it (float32)."""
    rng = np.random.default_rng(seed)
    if fmt.name in K_QUANT_SCALE_OFFSETS:
        blocks = _random_k_blocks(fmt, rows, cols, rng)
        reference = dequantize(blocks, GGMLQuantizationType(fmt.ggml_type))
        return QuantizedTensor(torch.from_numpy(blocks), fmt, cols), torch.from_numpy(np.array(reference, np.float32))
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    values[0, :32] = 0.0  # a block of zeros: scale 0
    values[-1, -32:] = 1e-3  # a constant block: every value equal
    blocks = quantize(values, GGMLQuantizationType(fmt.ggml_type))
    reference = torch.from_numpy(np.array(dequantize(blocks, GGMLQuantizationType(fmt.ggml_type)), np.float32))
    return QuantizedTensor(torch.from_numpy(blocks), fmt, cols), reference


def _assert_float32_sums_close(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                               bias: torch.Tensor | None = None) -> None:
    """out = x @ weight^T + bias up to float32 summation order: the error of a float32 sum of
    n products is at most ~n * 2^-24 of the sum of their magnitudes (4.6e-5 for n = 768);
    1e-5 of it leaves room for any order but not for a wrong value."""
    exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    magnitude = F.linear(x.double().abs(), weight.double().abs()) + (0 if bias is None else bias.double().abs())
    error = (out.double() - exact).abs()
    assert (error <= 1e-5 * magnitude + 1e-7).all(), (error / magnitude).max()


def _as_multiplied(x: torch.Tensor) -> torch.Tensor:
    """What the kernels multiply 32-value-block weights by, for any number of rows: x rounded
    to int8 per block (gguf_gemm_int8)."""
    return _int8_rounded(x)[0]


def _weight(*segments: QuantizedTensor) -> QuantizedWeight:
    rows = sum(tensor.shape[0] for tensor in segments)
    weight = QuantizedWeight(rows, segments[0].cols, torch.float32)
    first = 0
    for tensor in segments:
        weight.place(first, tensor)
        first += tensor.shape[0]
    weight.finalize("test", padded=False)
    return weight


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda fmt: fmt.name)
def test_dequantized_values_are_ggufs(fmt):
    tensor, reference = _quantized(fmt, 37, 512, seed=fmt.ggml_type)
    assert torch.equal(KERNELS.dequantize(tensor), reference)
    ids = torch.tensor([36, 0, 5, 5, 17])
    assert torch.equal(KERNELS.dequantize(tensor, ids), reference[ids])


def _int8_rounded(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, in] as gguf_gemm_int8 rounds it: per 32 values dx = max|x| / 127, x ~ dx * xq
    (float32, the kernel's operations) -> (dx * xq, dx [rows, in / 32])."""
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    dx = amax / 127.0
    return (torch.round(blocks * inverse) * dx).reshape(x.shape), dx.squeeze(-1)


# 32-value blocks: gguf_gemm_int8 for any number of rows (1, 2: straight from the blocks;
# 5, 8: a pass of 3 rows and leftovers; 64, 130: many passes, 130 leaving one row; 400: two
# panels of rows). K-quants: 1..8 rows gguf_gemm, more dequantized slabs through oneDNN.
@pytest.mark.parametrize("rows", [1, 2, 5, cpu_quantized.QUANTIZED_GEMM_MAX_ROWS, 64, 130, 400])
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda fmt: fmt.name)
def test_matmul_equals_float32_on_the_dequantized_weights(fmt, rows):
    tensor, reference = _quantized(fmt, 203, 768, seed=rows + fmt.ggml_type)
    x = torch.randn(rows, 768, generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(203)
    out = KERNELS.linear(x, _weight(tensor), bias)
    assert out.shape == (rows, 203) and out.dtype == torch.float32
    if fmt.block_size == 256 and rows > cpu_quantized.QUANTIZED_GEMM_MAX_ROWS:
        _assert_float32_sums_close(out, x, reference, bias)
    elif fmt.block_size == 256:
        # the same float dot products as the float32 small GEMM, on the same values: bit for bit
        assert torch.equal(out, small_linear(PLATFORM.kernels, x, reference, bias))
    else:
        # integer dot products: exactly the dequantized weights times the int8-rounded activations,
        # up to float32 summation order...
        rounded, dx = _int8_rounded(x)
        _assert_float32_sums_close(out, rounded, reference, bias)
        # ...which is the float product up to the rounding
        _assert_within_int8_rounding(out, x, reference, bias)


@pytest.mark.parametrize("fmt", [fmt for fmt in FORMATS if fmt.block_size == 32], ids=lambda fmt: fmt.name)
def test_rows_do_not_depend_on_the_batch(fmt):
    """A row of x gets bit for bit the same outputs alone, in a decode-sized batch, in a
    prefill-sized one and at any place in it: whichever tile shape, pass or leftover
    computes it. 25 blocks (not a multiple of the 8 the offsets are summed by), and 4 * 9 + 3
    weight rows in two segments (short tiles)."""
    first, reference_first = _quantized(fmt, 37, 800, seed=fmt.ggml_type)
    second, reference_second = _quantized(GGUF_FORMATS[2], 2, 800, seed=3)
    weight = _weight(first, second)
    x = torch.randn(203, 800, generator=torch.Generator().manual_seed(5))
    bias = torch.randn(39)
    whole = KERNELS.linear(x, weight, bias)
    _assert_float32_sums_close(whole, _int8_rounded(x)[0], torch.cat([reference_first, reference_second]), bias)
    for start, rows in ((0, 1), (7, 1), (200, 1), (3, 2), (10, 3), (11, 4), (50, 8), (1, 64), (5, 198)):
        assert torch.equal(KERNELS.linear(x[start:start + rows], weight, bias), whole[start:start + rows]), (start, rows)


def _assert_within_int8_rounding(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                 bias: torch.Tensor | None = None, rtol: float = 0.0) -> None:
    """out = x @ weight^T (+ bias) up to x's rounding to int8 per 32 values: |x - dx * xq| <=
    dx / 2 per value, so the error is at most the sum over blocks of dx / 2 * sum |w| of the
    block (rtol: out's own rounding, for 16-bit outputs)."""
    _, dx = _int8_rounded(x.float())
    block_sums = weight.abs().reshape(weight.shape[0], -1, 32).sum(-1)
    bound = 0.5 * dx.double() @ block_sums.double().T
    exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert ((out.double() - exact).abs() <= bound * 1.001 + rtol * exact.abs() + 1e-4).all()


@pytest.mark.parametrize("rows", [3, 100])
def test_segments_of_different_formats(rows):
    """A fused layer whose pieces came in different formats (Q/K in one, V in another)."""
    q4, reference_q4 = _quantized(GGUF_FORMATS[3], 100, 64, seed=1)
    q8, reference_q8 = _quantized(GGUF_FORMATS[8], 27, 64, seed=2)
    q4b, reference_q4b = _quantized(GGUF_FORMATS[3], 9, 64, seed=3)
    weight = _weight(q4, q8, q4b)
    assert [(first, tensor.format.name) for first, tensor in weight.segments] == [
        (0, "Q4_1"), (100, "Q8_0"), (127, "Q4_1")]
    x = torch.randn(rows, 64)
    reference = torch.cat([reference_q4, reference_q8, reference_q4b])
    _assert_float32_sums_close(KERNELS.linear(x, weight), _as_multiplied(x), reference)


def test_k_quant_segments_over_many_slabs(monkeypatch):
    """Many rows of a K-quant layer go through dequantized slabs: small enough here that each
    segment takes several, and a short last one."""
    monkeypatch.setattr(cpu_quantized, "SLAB_VALUES", 256 * 12)
    q4k, reference_q4k = _quantized(GGUF_FORMATS[12], 40, 256, seed=1)
    q6k, reference_q6k = _quantized(GGUF_FORMATS[14], 13, 256, seed=2)
    x = torch.randn(20, 256)
    _assert_float32_sums_close(KERNELS.linear(x, _weight(q4k, q6k)), x, torch.cat([reference_q4k, reference_q6k]))


def test_segments_stay_views_of_their_blocks():
    """No copy of a fused layer's pieces: they stay where the loader put them (the mapped file)."""
    first, reference_first = _quantized(GGUF_FORMATS[2], 16, 64, seed=4)
    second, reference_second = _quantized(GGUF_FORMATS[2], 8, 64, seed=5)
    weight = _weight(first, second)
    assert [(start, tensor.data.data_ptr()) for start, tensor in weight.segments] == [
        (0, first.data.data_ptr()), (16, second.data.data_ptr())]
    x = torch.randn(2, 64)
    _assert_float32_sums_close(KERNELS.linear(x, weight), _as_multiplied(x),
                               torch.cat([reference_first, reference_second]))


def test_bfloat16_activations_come_back_in_bfloat16():
    tensor, reference = _quantized(GGUF_FORMATS[8], 40, 96, seed=6)
    x = torch.randn(4, 96).bfloat16()
    out = KERNELS.linear(x, _weight(tensor))
    assert out.dtype == torch.bfloat16
    _assert_within_int8_rounding(out, x, reference, rtol=2**-8)


def test_embedding_lookup_returns_rows_in_the_model_dtype():
    tensor, reference = _quantized(GGUF_FORMATS[8], 50, 64, seed=7)
    weight = QuantizedWeight(50, 64, torch.bfloat16)
    weight.place(0, tensor)
    weight.finalize("embedding", padded=True)
    ids = torch.tensor([[3, 49], [0, 3]])
    out = KERNELS.embedding(ids, weight)
    assert out.shape == (2, 2, 64) and out.dtype == torch.bfloat16
    assert torch.equal(out, reference[ids].bfloat16())


def test_a_column_split_must_fall_between_blocks():
    tensor, reference = _quantized(GGUF_FORMATS[3], 4, 128, seed=8)
    half = tensor.narrow(1, 64, 64)
    assert half.shape == (4, 64)
    assert torch.equal(KERNELS.dequantize(_weight(half).segments[0][1]), reference[:, 64:])
    with pytest.raises(ValueError, match="Q4_1 weight splits only between its 32-value blocks"):
        tensor.narrow(1, 48, 80)


def test_unloaded_or_twice_loaded_rows_are_an_error():
    tensor, _ = _quantized(GGUF_FORMATS[8], 8, 32, seed=9)
    weight = QuantizedWeight(16, 32, torch.float32)
    weight.place(8, tensor)
    with pytest.raises(ValueError, match=r"rows \[0, 8\) were never loaded"):
        weight.finalize("layer", padded=False)
    weight = QuantizedWeight(16, 32, torch.float32)
    weight.place(0, tensor)
    with pytest.raises(ValueError, match=r"rows \[8, 16\) were never loaded"):
        weight.finalize("layer", padded=False)
    weight.place(4, tensor)
    with pytest.raises(ValueError, match=r"rows \[4, 8\) were loaded twice"):
        weight.finalize("layer", padded=False)


@pytest.mark.skipif(platform.machine() != "x86_64" or " avx2 " not in open("/proc/cpuinfo").read(),
                    reason="compares the AVX2 / AVX512-VNNI integer dot products with the portable loop")
@pytest.mark.parametrize("fmt", [fmt for fmt in FORMATS if fmt.block_size == 32], ids=lambda fmt: fmt.name)
def test_portable_integer_dot_products_match_the_vector_ones(fmt, portable_kernels):
    """Compilers for CPUs without AVX2 take the portable loop of quantized_dot.c: the same
    integer sums, float sums in another order."""
    portable = portable_kernels
    tensor, reference = _quantized(fmt, 67, 256, seed=11)
    x = torch.randn(7, 256)
    bias = torch.randn(67)
    out = portable.linear(x, _weight(tensor), bias)
    _assert_float32_sums_close(out, _int8_rounded(x)[0], reference, bias)
    _assert_float32_sums_close(KERNELS.linear(x, _weight(tensor), bias), _int8_rounded(x)[0], reference, bias)


@pytest.fixture(scope="module")
def portable_kernels(tmp_path_factory):
    """The quantized kernels built without AVX2 (so without AVX-512 either)."""
    sources = [os.path.join(os.path.dirname(kernels.__file__), "csrc", name)
               for name in ("quantized_gemm.c", "quantized_dot.c")]
    built = str(tmp_path_factory.mktemp("portable") / "portable.so")
    assert kernels.build_library(os.environ.get("CC") or "cc", sources, built, ["-mno-avx2"]) is None
    lib = ctypes.CDLL(built)
    for name in ("gguf_dequantize", "gguf_gemm", "gguf_gemm_int8"):
        getattr(lib, name).restype = ctypes.c_int
    return cpu_quantized.QuantizedKernels(lib)
