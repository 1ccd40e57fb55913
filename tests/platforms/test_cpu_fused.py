"""The fused CPU kernels (platforms/cpu/csrc/fused_ops.c) against the PyTorch
expressions they replace, in float32 and bfloat16; the layers take them from the
CPU platform when they are built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm.layers.activation import SiluAndMul
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.platforms.cpu import CpuPlatform

PLATFORM = CpuPlatform()
pytestmark = pytest.mark.skipif(PLATFORM.kernels is None, reason="no C compiler")
DTYPES = [torch.float32, torch.bfloat16]
# float32: the kernels sum in another order. bfloat16: both sides compute in float32 and round
# once, so they differ by at most one bfloat16 ulp (2^-8 relative) where a sum lands on a tie.
TOLERANCES = {torch.float32: {}, torch.bfloat16: {"rtol": 2 ** -7, "atol": 1e-2}}


def reference_norm(x, weight, eps, offset):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * (weight.float() + offset)).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 5, 300])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_and_fused_residual_add(rows, offset, dtype):
    ops = PLATFORM.fused_ops(dtype)
    generator = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 96, generator=generator) * 3).to(dtype)
    residual = torch.randn(rows, 96, generator=generator).to(dtype)
    weight = torch.randn(96, generator=generator).to(dtype)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-5, offset), reference_norm(x, weight, 1e-5, offset),
                               **TOLERANCES[dtype])
    summed = x + residual
    expected = reference_norm(summed, weight, 1e-5, offset)
    assert ops.add_rms_norm_(x, residual, weight, 1e-5, offset)
    assert torch.equal(residual, summed)  # one rounded add either way
    torch.testing.assert_close(x, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_layer_returns_the_same_values_either_way(dtype):
    torch.set_default_dtype(dtype)
    try:
        norm = RMSNorm(64, eps=1e-6)
    finally:
        torch.set_default_dtype(torch.float32)
    assert norm.fused is not None and norm.fused.dtype == dtype
    norm.weight.data = torch.randn(64).to(dtype)
    x, residual = torch.randn(7, 64).to(dtype), torch.randn(7, 64).to(dtype)
    expected_sum = x + residual
    expected = norm._norm(expected_sum)
    out, new_residual = norm(x.clone(), residual.clone())
    assert torch.equal(new_residual, expected_sum)
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])
    torch.testing.assert_close(norm(x), norm._norm(x), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul(dtype):
    x = (torch.randn(33, 2 * 40) * 4).to(dtype)
    gate, up = x.float().chunk(2, dim=-1)
    out = PLATFORM.fused_ops(dtype).silu_and_mul(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, (F.silu(gate) * up).to(dtype), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rotary_dim", [None, 32])
def test_rotary_in_place_on_qkv_slices(rotary_dim, dtype):
    """q and k are column slices of one QKV matrix, as in the attention layers;
    partial rotary leaves the last features alone."""
    torch.set_default_dtype(dtype)
    try:
        rope = RotaryEmbedding(64, 512, 10000.0, rotary_dim=rotary_dim)
    finally:
        torch.set_default_dtype(torch.float32)
    assert rope.cos_cache.dtype == torch.float32 and rope.fused.dtype == dtype
    tokens, heads, kv_heads = 9, 4, 2
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * 64).to(dtype)
    positions = torch.tensor([0, 1, 2, 100, 101, 7, 511, 3, 3])
    q, k, v = qkv.split([heads * 64, kv_heads * 64, kv_heads * 64], dim=-1)
    q, k = q.view(tokens, heads, 64), k.view(tokens, kv_heads, 64)
    cos = rope.cos_cache[positions].unsqueeze(1)
    sin = rope.sin_cache[positions].unsqueeze(1)
    # The reference in float32, rounded once (the torch path rounds each product in bfloat16).
    expected_q = rope._rotate(q.float(), cos, sin).to(dtype)
    expected_k = rope._rotate(k.float(), cos, sin).to(dtype)
    v_before = v.clone()
    rotated_q, rotated_k = rope(positions, q, k)
    assert rotated_q.data_ptr() == qkv.data_ptr()  # in place
    torch.testing.assert_close(rotated_q, expected_q, **TOLERANCES[dtype])
    torch.testing.assert_close(rotated_k, expected_k, **TOLERANCES[dtype])
    assert torch.equal(v, v_before)


def test_bfloat16_rounds_to_nearest_even_as_torch():
    """The kernels' float32 -> bfloat16 rounding, on float32 values between two bfloat16s:
    ties (to even, both ways), just above and below them, inf, NaN, and a carry into the
    exponent. Rotary with x = (1, 0), sin = 0 and cos = w writes exactly w, rounded."""
    ops = PLATFORM.fused_ops(torch.bfloat16)
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x7F800000, 0x7FC00000, 0x4B7FFFFF],
                        dtype=torch.int64).to(torch.int32)
    w = bits.view(torch.float32)
    n = len(w)
    cos_cache = torch.stack([w, torch.ones(n)], dim=1)  # [n positions, rotary_dim 2]
    sin_cache = torch.zeros(n, 2)
    x = torch.tensor([[[1.0, 0.0]]] * n, dtype=torch.bfloat16)  # [n tokens, 1 head, head_dim 2]
    key = x.clone()
    assert ops.rotary_(x, key, torch.arange(n), cos_cache, sin_cache)
    expected = w.to(torch.bfloat16)
    assert torch.equal(x[:, 0, 0].isnan(), expected.isnan())
    assert torch.equal(x[:, 0, 0][~expected.isnan()], expected[~expected.isnan()])


def test_other_dtypes_have_no_fused_ops():
    assert PLATFORM.fused_ops(torch.float16) is None
    ops = PLATFORM.fused_ops(torch.float32)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    assert ops.rms_norm(x, torch.ones(16, dtype=torch.bfloat16), 1e-6, 0.0) is None  # not the bound dtype
    assert ops.silu_and_mul(x) is None
