"""The compiled CPU decode kernel (with the torch path for prefill chunks) and KV
writer against the naive dense reference and the torch writer. Unused pool slots hold NaN: the kernel must
never read outside a request's context."""

from __future__ import annotations

import pytest
import torch

from pagedllm import cpu_kernels
from pagedllm.attention import cpu_backend, torch_backend
from tests.attention.helpers import FEATURES, case_params, check_backend


def test_kernel_builds_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path))
    cpu_kernels.load_kernel_library.cache_clear()
    try:
        assert cpu_kernels.load_kernel_library() is not None
        assert list(tmp_path.glob("kernels/*/libpagedllm_cpu.so"))
    finally:
        cpu_kernels.load_kernel_library.cache_clear()


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("case", case_params())
def test_matches_naive_reference(case, feature):
    check_backend(cpu_backend, case, feature)


@pytest.mark.parametrize("num_tokens", [3, 70])  # below and above the kernel's threading threshold
def test_write_kv_from_qkv_slices_matches_torch(num_tokens):
    """K and V arrive as column slices of the QKV projection (row stride > row size)."""
    num_kv_heads, head_dim, block_size, num_blocks = 2, 16, 8, 12
    qkv = torch.randn(num_tokens, (4 + 2 * num_kv_heads) * head_dim)
    key = qkv[:, 4 * head_dim:6 * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, 6 * head_dim:].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    caches = [torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan")) for _ in range(2)]
    cpu_backend.write_kv(key, value, caches[0], slots)
    torch_backend.write_kv(key, value, caches[1], slots)
    torch.testing.assert_close(caches[0], caches[1], rtol=0, atol=0, equal_nan=True)
    assert caches[0].isnan().sum() == 2 * (num_blocks * block_size - num_tokens) * num_kv_heads * head_dim
