"""Triton paged attention against the naive reference and the torch backend.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (see
conftest.py), on tiny shapes. TestTritonCUDA runs the compiled kernels on a GPU,
over more shapes and features and at realistic sizes:
    pytest tests/attention -k CUDA
"""

from __future__ import annotations

import math

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from pagedllm.attention import get_attention_backend, torch_backend, triton_backend
from pagedllm.platforms.cpu import attention as cpu_backend
from tests.attention.helpers import (CASES, FEATURES, KV_DTYPES, Case, case_params, check_backend, feature_kwargs,
                                     make_batch, run_backend)

INTERPRETED = isinstance(triton_backend._paged_attention_kernel, InterpretedFunction)
HALF_DTYPES = [pytest.param(torch.float16, id="float16"), pytest.param(torch.bfloat16, id="bfloat16")]
# The interpreter keeps bfloat16 as raw uint16 and does not support arithmetic on it
# (tl.dot multiplies the bit patterns: triton-lang/triton#11584, "not supported yet").
INTERPRETER_HALF_DTYPES = [
    pytest.param(torch.float16, id="float16"),
    pytest.param(torch.bfloat16, id="bfloat16", marks=pytest.mark.skip(
        reason="Triton interpreter computes on bfloat16 bit patterns (triton#11584); covered on CUDA"))]

# The interpreter is slow: every feature on two shapes, the plain case on all.
INTERPRETER_FEATURES = (
    [pytest.param(CASES[name], feature, id=f"{name}-{feature}") for name in ("mixed_gqa", "mqa_long_context")
     for feature in FEATURES if feature != "plain"]
    + [pytest.param(CASES["group3"], "all", id="group3-all")])

# Realistic shapes for the GPU: long contexts, a long prefill chunk after a
# cached prefix, a fresh prompt, decodes; head_dim 64 / 128 / 256.
LARGE_CASES = {
    "llama_d128": Case((1, 1, 1, 512, 300, 1), (1, 2047, 700, 1536, 300, 33), 32, 8, 128, 16),
    "mha_d64": Case((1, 1, 200, 77), (1000, 15, 200, 1100), 12, 12, 64, 16),
    "gemma_d256": Case((1, 1, 130, 7), (513, 64, 400, 7), 8, 4, 256, 16),
    "qwen_group7": Case((1, 1, 97), (900, 31, 350), 14, 2, 64, 32),
}


def write_kv_check(device: str, dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> None:
    """Both backends write identical pools (of kv_dtype, cast), from K/V that are
    strided views of a fused qkv projection as the Attention layer passes them."""
    case = CASES["mixed_gqa"]
    batch = make_batch(case, dtype, device, kv_dtype=kv_dtype)
    num_tokens, hkv, dim = batch.new_key.shape
    qkv = torch.randn(num_tokens, (case.num_heads + 2 * hkv) * dim, device=device).to(dtype)
    key = qkv[:, case.num_heads * dim:(case.num_heads + hkv) * dim].view(num_tokens, hkv, dim)
    value = qkv[:, (case.num_heads + hkv) * dim:].view(num_tokens, hkv, dim)
    expected = batch.kv_cache.clone()
    torch_backend.write_kv(key, value, expected, batch.metadata.slot_mapping)
    triton_backend.write_kv(key, value, batch.kv_cache, batch.metadata.slot_mapping)
    torch.testing.assert_close(batch.kv_cache, expected, rtol=0, atol=0, equal_nan=True)


def torch_backend_check(device: str, feature: str) -> None:
    """Invariant 10: the kernel agrees with the baseline it replaces."""
    case = CASES["mixed_gqa"]
    scale = 1.0 / math.sqrt(case.head_dim)
    kwargs = feature_kwargs(feature, case.num_heads, device)
    out = run_backend(triton_backend, make_batch(case, device=device, fill=0.0), scale, **kwargs)
    expected = run_backend(torch_backend, make_batch(case, device=device, fill=0.0), scale, **kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def noncontiguous_query_check(device: str) -> None:
    case = CASES["mixed_gqa"]
    batch = make_batch(case, device=device)
    num_tokens, num_heads, dim = batch.query.shape
    fused = torch.randn(num_tokens, 2 * num_heads * dim, device=device)
    fused[:, :num_heads * dim] = batch.query.reshape(num_tokens, -1)
    strided = fused[:, :num_heads * dim].view(num_tokens, num_heads, dim)
    assert not strided.is_contiguous()
    scale = 1.0 / math.sqrt(dim)
    triton_backend.write_kv(batch.new_key, batch.new_value, batch.kv_cache, batch.metadata.slot_mapping)
    out = triton_backend.paged_attention(strided, batch.kv_cache, batch.metadata, scale)
    expected = triton_backend.paged_attention(batch.query, batch.kv_cache, batch.metadata, scale)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.skipif(not INTERPRETED, reason="kernels are compiled for a GPU (TRITON_INTERPRET is not 1)")
class TestTritonInterpreter:
    """The kernels' logic on CPU tensors, through the Triton interpreter."""

    @pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="float32")] + HALF_DTYPES)
    def test_write_kv_matches_torch(self, dtype):
        write_kv_check("cpu", dtype)

    @pytest.mark.parametrize("case", case_params())
    def test_plain(self, case):
        check_backend(triton_backend, case, "plain")

    @pytest.mark.parametrize("case, feature", INTERPRETER_FEATURES)
    def test_features(self, case, feature):
        check_backend(triton_backend, case, feature)

    @pytest.mark.parametrize("feature", ["plain", "all"])
    @pytest.mark.parametrize("dtype", INTERPRETER_HALF_DTYPES)
    def test_half_precision(self, dtype, feature):
        check_backend(triton_backend, CASES["mixed_gqa"], feature, dtype=dtype)

    @pytest.mark.parametrize("feature", ["plain", "all"])
    def test_float16_pool_under_float32_queries(self, feature):
        check_backend(triton_backend, CASES["mixed_gqa"], feature, kv_dtype=torch.float16)

    def test_write_kv_casts_to_the_pool_dtype(self):
        write_kv_check("cpu", torch.float32, kv_dtype=torch.float16)

    @pytest.mark.parametrize("feature", ["plain", "all"])
    def test_matches_torch_backend(self, feature):
        torch_backend_check("cpu", feature)

    def test_noncontiguous_query(self):
        noncontiguous_query_check("cpu")


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs CUDA, kernels compiled")
class TestTritonCUDA:
    """The compiled kernels on a GPU: every shape x feature x dtype, and realistic sizes."""

    @pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="float32")] + HALF_DTYPES)
    def test_write_kv_matches_torch(self, dtype):
        write_kv_check("cuda", dtype)

    @pytest.mark.parametrize("feature", list(FEATURES))
    @pytest.mark.parametrize("case", case_params())
    def test_features(self, case, feature):
        check_backend(triton_backend, case, feature, device="cuda")

    @pytest.mark.parametrize("feature", ["plain", "all"])
    @pytest.mark.parametrize("case", case_params())
    @pytest.mark.parametrize("dtype", HALF_DTYPES)
    def test_half_precision(self, dtype, case, feature):
        check_backend(triton_backend, case, feature, dtype=dtype, device="cuda")

    @pytest.mark.parametrize("feature", ["plain", "all"])
    @pytest.mark.parametrize("case", case_params())
    @pytest.mark.parametrize("kv_dtype", KV_DTYPES)
    def test_16_bit_pool_under_float32_queries(self, kv_dtype, case, feature):
        check_backend(triton_backend, case, feature, kv_dtype=kv_dtype, device="cuda")

    @pytest.mark.parametrize("kv_dtype", KV_DTYPES)
    def test_write_kv_casts_to_the_pool_dtype(self, kv_dtype):
        write_kv_check("cuda", torch.float32, kv_dtype=kv_dtype)

    @pytest.mark.parametrize("feature", ["plain", "all"])
    @pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="float32")] + HALF_DTYPES)
    @pytest.mark.parametrize("case", [pytest.param(c, id=name) for name, c in LARGE_CASES.items()])
    def test_large(self, case, dtype, feature):
        check_backend(triton_backend, case, feature, dtype=dtype, device="cuda")

    @pytest.mark.parametrize("feature", ["plain", "all"])
    def test_matches_torch_backend(self, feature):
        torch_backend_check("cuda", feature)

    def test_noncontiguous_query(self):
        noncontiguous_query_check("cuda")


def test_empty_batch():
    case = CASES["decode_only"]
    batch = make_batch(case)
    empty = batch.query[:0]
    triton_backend.write_kv(batch.new_key[:0], batch.new_value[:0], batch.kv_cache,
                            batch.metadata.slot_mapping[:0])
    assert triton_backend.paged_attention(empty, batch.kv_cache, batch.metadata, 1.0).shape == empty.shape


def test_rejects_bad_inputs():
    batch = make_batch(CASES["decode_only"])
    with pytest.raises(TypeError, match="dtype"):
        triton_backend.paged_attention(batch.query.double(), batch.kv_cache, batch.metadata, 1.0)
    with pytest.raises(ValueError, match="kv_cache must be"):
        triton_backend.paged_attention(batch.query, batch.kv_cache[..., :32], batch.metadata, 1.0)
    with pytest.raises(ValueError, match="sliding_window"):
        triton_backend.paged_attention(batch.query, batch.kv_cache, batch.metadata, 1.0, sliding_window=0)


class TestBackendSelection:
    def test_default_by_device(self, monkeypatch):
        monkeypatch.delenv("PAGEDLLM_ATTENTION_BACKEND", raising=False)
        assert get_attention_backend("cpu") is cpu_backend
        assert get_attention_backend("cuda") is triton_backend
        assert get_attention_backend("cuda:1") is triton_backend

    def test_explicit_name_wins(self, monkeypatch):
        monkeypatch.setenv("PAGEDLLM_ATTENTION_BACKEND", "triton")
        assert get_attention_backend("cuda", "torch") is torch_backend
        assert get_attention_backend("cpu", "Triton") is triton_backend

    def test_environment_overrides_default(self, monkeypatch):
        monkeypatch.setenv("PAGEDLLM_ATTENTION_BACKEND", "torch")
        assert get_attention_backend("cuda") is torch_backend
        monkeypatch.setenv("PAGEDLLM_ATTENTION_BACKEND", "triton")
        assert get_attention_backend("cpu") is triton_backend

    def test_unknown_name(self, monkeypatch):
        monkeypatch.delenv("PAGEDLLM_ATTENTION_BACKEND", raising=False)
        with pytest.raises(ValueError, match="unknown attention backend"):
            get_attention_backend("cpu", "flash")
