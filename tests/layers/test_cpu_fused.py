"""The fused CPU kernels (layers/cpu_fused_ops.c) against the PyTorch
expressions they replace; the layers call them for float32 on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm.layers import cpu_fused
from pagedllm.layers.activation import SiluAndMul
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.skipif(cpu_fused.load_kernel_library() is None, reason="no C compiler")


def reference_norm(x, weight, eps, offset):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (weight + offset)


@pytest.mark.parametrize("rows", [1, 5, 300])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_and_fused_residual_add(rows, offset):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=generator) * 3
    residual = torch.randn(rows, 96, generator=generator)
    weight = torch.randn(96, generator=generator)
    torch.testing.assert_close(cpu_fused.rms_norm(x, weight, 1e-5, offset), reference_norm(x, weight, 1e-5, offset))
    summed = x + residual
    expected = reference_norm(summed, weight, 1e-5, offset)
    assert cpu_fused.add_rms_norm_(x, residual, weight, 1e-5, offset)
    torch.testing.assert_close(residual, summed)
    torch.testing.assert_close(x, expected)


def test_rms_norm_layer_returns_the_same_values_either_way():
    norm = RMSNorm(64, eps=1e-6)
    norm.weight.data = torch.randn(64)
    x, residual = torch.randn(7, 64), torch.randn(7, 64)
    expected_sum = x + residual
    expected = norm._norm(expected_sum)
    out, new_residual = norm(x.clone(), residual.clone())
    torch.testing.assert_close(new_residual, expected_sum)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(norm(x), norm._norm(x))


def test_silu_and_mul():
    x = torch.randn(33, 2 * 40) * 4
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(SiluAndMul()(x), F.silu(gate) * up)


@pytest.mark.parametrize("rotary_dim", [None, 32])
def test_rotary_in_place_on_qkv_slices(rotary_dim):
    """q and k are column slices of one QKV matrix, as in the attention layers;
    partial rotary leaves the last features alone."""
    rope = RotaryEmbedding(64, 512, 10000.0, rotary_dim=rotary_dim)
    tokens, heads, kv_heads = 9, 4, 2
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * 64)
    positions = torch.tensor([0, 1, 2, 100, 101, 7, 511, 3, 3])
    q, k, v = qkv.split([heads * 64, kv_heads * 64, kv_heads * 64], dim=-1)
    q, k = q.view(tokens, heads, 64), k.view(tokens, kv_heads, 64)
    cos = rope.cos_cache[positions].unsqueeze(1)
    sin = rope.sin_cache[positions].unsqueeze(1)
    expected_q, expected_k = rope._rotate(q.clone(), cos, sin), rope._rotate(k.clone(), cos, sin)
    v_before = v.clone()
    rotated_q, rotated_k = rope(positions, q, k)
    assert rotated_q.data_ptr() == qkv.data_ptr()  # in place
    torch.testing.assert_close(rotated_q, expected_q)
    torch.testing.assert_close(rotated_k, expected_k)
    assert torch.equal(v, v_before)


def test_other_dtypes_use_pytorch():
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    assert cpu_fused.rms_norm(x, torch.ones(16, dtype=torch.bfloat16), 1e-6, 0.0) is None
    assert cpu_fused.silu_and_mul(x) is None
