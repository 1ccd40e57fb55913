"""The CPU platform's linear layers (csrc/small_gemm.c for few rows, oneDNN for more,
float32) against torch's F.linear."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pagedllm.platforms.cpu import CpuPlatform
from pagedllm.platforms.cpu.isa import CpuFeatures
from pagedllm.platforms.cpu.fused import small_linear
from pagedllm.platforms.cpu.linear import (SMALL_GEMM_MAX_ROWS, bucket_rows, onednn_bucketed_linear,
                                           pack_bfloat16_weights)

PLATFORM = CpuPlatform()
linear = PLATFORM.linear(torch.float32)


# 1..SMALL_GEMM_MAX_ROWS rows take the small-batch kernel, 128 oneDNN; 3001 and 61 are
# not multiples of the kernel's 8-row weight tiles and 8-float vectors.
@pytest.mark.parametrize("rows", [1, 7, SMALL_GEMM_MAX_ROWS, 128])
@pytest.mark.parametrize("in_features,out_features", [(64, 3001), (576, 960), (1536, 576), (61, 13)])
@pytest.mark.parametrize("bias", [False, True])
def test_float32_matches_plain_pytorch(rows, in_features, out_features, bias):
    generator = torch.Generator().manual_seed(rows * 7 + out_features)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5
    b = torch.randn(out_features, generator=generator) if bias else None
    out = linear(x, weight, b)
    assert out.shape == (rows, out_features) and out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_small_batch_kernel_runs_and_matches():
    """The kernel itself (not a silent fallback to oneDNN) against float64."""
    x = torch.randn(5, 100)
    weight = torch.randn(37, 100)
    bias = torch.randn(37)
    out = small_linear(PLATFORM.kernels, x, weight, bias)
    assert out is not None
    torch.testing.assert_close(out.double(), F.linear(x.double(), weight.double(), bias.double()), rtol=1e-5,
                               atol=1e-4)


@pytest.mark.parametrize("rows", [6, 100])
def test_a_sliced_input_matches(rows):
    """Hidden states gathered for the LM head are a fresh tensor, but row views of a
    batch and column slices (a row stride wider than the row) must work too."""
    x = torch.randn(rows + 4, 96)
    weight = torch.randn(32, 64)
    for view in (x[2:2 + rows, :64], x[2:2 + rows, 32:]):
        torch.testing.assert_close(linear(view, weight), F.linear(view, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not PLATFORM.features.onednn_bf16,
                    reason="oneDNN's bfloat16 matmul needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT")
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 100, 2048, 2049])
@pytest.mark.parametrize("bias", [False, True])
def test_bfloat16_padded_to_buckets_and_packed_equals_plain_pytorch(rows, bias):
    """Zero rows padded below x and oneDNN's packed weight layout change no output bit."""
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=generator).to(torch.bfloat16)
    weight = torch.randn(40, 96, generator=generator).to(torch.bfloat16)
    b = torch.randn(40, generator=generator).to(torch.bfloat16) if bias else None
    linear16 = PLATFORM.linear(torch.bfloat16)
    expected = linear16(x, weight, b)
    assert expected.shape == (rows, 40)
    torch.testing.assert_close(expected, F.linear(x, weight, b))
    layer = torch.nn.Module()
    layer.weight, layer.linear = torch.nn.Parameter(weight, requires_grad=False), linear16
    pack_bfloat16_weights(layer)
    assert layer.weight.is_mkldnn
    assert torch.equal(linear16(x, layer.weight, b), expected)


def test_row_buckets():
    assert [bucket_rows(n) for n in (1, 16, 17, 24, 25, 2048, 2049, 5000)] == [16, 16, 24, 24, 32, 2048, 4096, 6144]


def test_float16_is_plain_pytorch():
    assert PLATFORM.linear(torch.float16) is F.linear


def test_bfloat16_takes_onednn_only_where_it_runs():
    """oneDNN's bfloat16 matmul and packing raise without AVX-512 BW/VL/DQ or AVX-NE-CONVERT
    (an AVX2 EPYC): there bfloat16 layers take PyTorch's own matmul, and packing leaves them."""
    avx2 = CpuPlatform(CpuFeatures("AVX2 CPU", frozenset({"avx2", "fma"}), 2))
    assert avx2.linear(torch.bfloat16) is F.linear
    layer = torch.nn.Module()
    layer.weight, layer.linear = torch.nn.Parameter(torch.randn(8, 16).bfloat16(), requires_grad=False), F.linear
    avx2.process_weights_after_loading(layer)
    assert not layer.weight.is_mkldnn
    for flags in ({"avx512f", "avx512bw", "avx512vl", "avx512dq"}, {"avx2", "avx_ne_convert"}):
        assert CpuPlatform(CpuFeatures("", frozenset(flags), 2)).linear(torch.bfloat16) is onednn_bucketed_linear


# oneDNN (and torch's ideep above it) keep one prepared matmul per shape: float32's
# unpadded row counts made a new one every batch size, ~200 KiB each, 1024 kept by
# default (61 MiB over these 600 row counts). In a fresh process: the caches read
# their capacity on first use.
_NEW_ROW_COUNTS_PROBE = """
import ctypes, gc, random, psutil, torch
from pagedllm.platforms.cpu.linear import SMALL_GEMM_MAX_ROWS, float32_linear
linear = float32_linear(None)
weight, rng, libc = torch.randn(1536, 576), random.Random(0), ctypes.CDLL("libc.so.6")
def rss():
    gc.collect(); libc.malloc_trim(0); return psutil.Process().memory_info().rss
def run(count):
    for _ in range(count):
        linear(torch.randn(rng.randint(SMALL_GEMM_MAX_ROWS + 1, 600), 576), weight)
run(300); before = rss(); run(600)
print((rss() - before) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_memory_stays_flat_over_new_batch_sizes():
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    result = subprocess.run([sys.executable, "-c", _NEW_ROW_COUNTS_PROBE], capture_output=True, text=True, env=env,
                            check=True, timeout=300)
    assert int(result.stdout.split()[-1]) < 16  # MiB; measured 0
