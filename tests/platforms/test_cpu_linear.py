"""The CPU platform's linear layers (csrc/small_gemm.c for few rows, oneDNN for more,
float32) against torch's F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm.platforms.cpu import CpuPlatform
from pagedllm.platforms.cpu.fused import small_linear
from pagedllm.platforms.cpu.linear import SMALL_GEMM_MAX_ROWS, bucket_rows, pack_bfloat16_weights

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
