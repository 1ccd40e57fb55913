"""The compiled CPU decode and prefill kernels (with the torch path for the prompts
they do not cover) and KV writer against the naive dense reference and the torch
writer, with float32, float16 and bfloat16 pools, and their builds for CPUs without
F16C or AVX-512. Unused pool slots hold NaN: the kernels must never read outside a
request's context."""

from __future__ import annotations

import ctypes
import math
import os
import platform

import pytest
import torch

from pagedllm.attention import torch_backend
from pagedllm.platforms.cpu import attention as cpu_backend
from pagedllm.platforms.cpu import kernels as cpu_kernels
from tests.attention.helpers import CASES, FEATURES, KV_DTYPES, case_params, check_backend, make_batch


def test_kernel_builds_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path))
    cpu_kernels.load_kernel_library.cache_clear()
    try:
        assert cpu_kernels.load_kernel_library() is not None
        assert list(tmp_path.glob("kernels/*/libpagedllm_cpu.so"))
    finally:
        cpu_kernels.load_kernel_library.cache_clear()


def test_loading_the_kernels_keeps_subnormal_floats():
    """The library is compiled with -ffast-math but must not switch the loading
    thread to flush-to-zero (what GCC's crtfastmath.o does when linked in)."""
    assert cpu_kernels.load_kernel_library() is not None
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("case", case_params())
def test_matches_naive_reference(case, feature):
    check_backend(cpu_backend, case, feature)


@pytest.mark.parametrize("feature", ["plain", "all"])
@pytest.mark.parametrize("case", case_params())
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_16_bit_pool_matches_naive_reference(case, feature, kv_dtype):
    check_backend(cpu_backend, case, feature, kv_dtype=kv_dtype)


@pytest.mark.parametrize("feature", ["plain", "all"])
@pytest.mark.parametrize("case", case_params())
@pytest.mark.parametrize("dtype", KV_DTYPES)
def test_16_bit_queries_and_pool_match_naive_reference(case, feature, dtype):
    """A 16-bit model: queries are widened for the kernel, its output rounded back."""
    check_backend(cpu_backend, case, feature, dtype=dtype)


@pytest.mark.parametrize("kv_dtype", list(cpu_backend.KV_FORMATS), ids=str)
@pytest.mark.parametrize("num_tokens", [3, 70])  # below and above the kernel's threading threshold
def test_write_kv_from_qkv_slices_matches_torch(num_tokens, kv_dtype):
    """K and V arrive as column slices of the QKV projection (row stride > row size)."""
    num_kv_heads, head_dim, block_size, num_blocks = 2, 16, 8, 12
    qkv = torch.randn(num_tokens, (4 + 2 * num_kv_heads) * head_dim)
    key = qkv[:, 4 * head_dim:6 * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, 6 * head_dim:].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    caches = [torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=kv_dtype)
              for _ in range(2)]
    cpu_backend.write_kv(key, value, caches[0], slots)
    torch_backend.write_kv(key, value, caches[1], slots)
    torch.testing.assert_close(caches[0], caches[1], rtol=0, atol=0, equal_nan=True)
    assert caches[0].isnan().sum() == 2 * (num_blocks * block_size - num_tokens) * num_kv_heads * head_dim


def build_attention_kernels(tmp_path, flags: list[str]) -> ctypes.CDLL:
    """The decode and prefill kernels built with extra compiler flags (another ISA's build)."""
    sources = [os.path.join(os.path.dirname(cpu_backend.__file__), "csrc", name)
               for name in ("decode_attention.c", "prefill_attention.c")]
    built = str(tmp_path / "kernels.so")
    assert cpu_kernels.build_library(os.environ.get("CC") or "cc", sources, built, flags) is None
    library = ctypes.CDLL(built)
    library.paged_decode_attention.restype = library.paged_prefill_attention.restype = ctypes.c_int
    return library


@pytest.mark.skipif(platform.machine() != "x86_64" or "f16c" not in open("/proc/cpuinfo").read(),
                    reason="compares the F16C conversion with the portable one")
def test_portable_float16_conversion_matches_f16c(tmp_path, monkeypatch):
    """Compilers without F16C take the integer float16 -> float32 conversion:
    the same kernel built with -mno-f16c must agree, with normal keys and values
    that are mostly subnormal halves (flushing them would zero the output)."""
    portable = build_attention_kernels(tmp_path, ["-mno-f16c"])

    case = CASES["decode_group3_dim80"]  # decodes only: every row goes through the kernel
    batch = make_batch(case, kv_dtype=torch.float16, fill=0.0)
    torch_backend.write_kv(batch.new_key, batch.new_value, batch.kv_cache, batch.metadata.slot_mapping)
    batch.kv_cache[1] = (batch.kv_cache[1].float() * 1e-5).half()
    stored = batch.kv_cache[1][batch.kv_cache[1] != 0]
    assert (stored.abs() < 6.1e-5).float().mean() > 0.9

    scale = 1 / math.sqrt(case.head_dim)
    f16c = cpu_backend.paged_attention(batch.query, batch.kv_cache, batch.metadata, scale)
    monkeypatch.setattr(cpu_backend, "load_kernel_library", lambda: portable)
    without_f16c = cpu_backend.paged_attention(batch.query, batch.kv_cache, batch.metadata, scale)
    assert f16c.abs().min() > 0
    # Not bit-equal: -ffast-math may order the sums differently in the two builds.
    torch.testing.assert_close(without_f16c, f16c, rtol=1e-4, atol=0)


@pytest.mark.skipif(platform.machine() != "x86_64" or "avx512f" not in open("/proc/cpuinfo").read(),
                    reason="compares the AVX-512 build of the kernels with the AVX2 one")
def test_avx2_build_matches_avx512(tmp_path, monkeypatch):
    """CPUs without AVX-512 get the 16-float vectors as pairs of 8: the same kernels
    built with -mno-avx512f must agree with this CPU's build."""
    avx2 = build_attention_kernels(tmp_path, ["-mno-avx512f"])

    case = CASES["prefill_group8_chunks"]
    batch = make_batch(case, kv_dtype=torch.bfloat16)
    torch_backend.write_kv(batch.new_key, batch.new_value, batch.kv_cache, batch.metadata.slot_mapping)
    scale = 1 / math.sqrt(case.head_dim)
    native = cpu_backend.paged_attention(batch.query, batch.kv_cache, batch.metadata, scale)
    monkeypatch.setattr(cpu_backend, "load_kernel_library", lambda: avx2)
    portable = cpu_backend.paged_attention(batch.query, batch.kv_cache, batch.metadata, scale)
    torch.testing.assert_close(portable, native, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(platform.machine() != "x86_64" or "avx512_bf16" not in open("/proc/cpuinfo").read(),
                    reason="compares the AVX512-BF16 attention loops with the widening ones")
@pytest.mark.parametrize("case_name", ["mixed_gqa", "mha_long_prompt", "decode_dim128_stages", "prefill_group8_chunks"])
def test_bfloat16_dot_products_match_widened_floats(tmp_path, monkeypatch, case_name):
    """A bfloat16 model over a bfloat16 cache multiplies bfloat16 pairs where the CPU
    has AVX512-BF16; the build without it widens every element to float32. Decode: both
    multiply the same exact values, so the float32 outputs agree up to summation order.
    Prefill also rounds the softmax weights to bfloat16 for P.V (2^-9 relative each), so
    agreement is to bfloat16's precision. Head sizes 32, 128 and 64; 1, 2, 4 and 8 query
    heads per KV head; prompts of 1-100 tokens over several query tiles."""
    widening = build_attention_kernels(tmp_path, ["-mno-avx512bf16"])

    case = CASES[case_name]
    batch = make_batch(case, torch.bfloat16)
    torch_backend.write_kv(batch.new_key, batch.new_value, batch.kv_cache, batch.metadata.slot_mapping)
    plan = cpu_backend.StepPlan(batch.metadata)
    query, scale = batch.query.float(), 1 / math.sqrt(case.head_dim)
    decodes = torch.tensor(batch.metadata.query_start_np[plan.decodes], dtype=torch.long)
    outputs = []
    for library in (cpu_kernels.load_kernel_library(), widening):
        monkeypatch.setattr(cpu_backend, "load_kernel_library", lambda library=library: library)
        output = torch.zeros_like(query)
        if len(plan.decodes):
            cpu_backend.decode_attention(output, query, batch.kv_cache, plan, scale, None, None, None,
                                         bf16_queries=True)
        if len(plan.prompts):
            cpu_backend.prefill_attention(output, query, batch.kv_cache, plan, scale, bf16_queries=True)
        outputs.append(output)
    assert outputs[0].abs().max() > 0
    torch.testing.assert_close(outputs[0][decodes], outputs[1][decodes], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=8e-3, atol=8e-3)
