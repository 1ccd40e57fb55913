"""The compiled CPU decode kernel (with the torch path for prefill chunks)
against the naive dense reference. Unused pool slots hold NaN: the kernel must
never read outside a request's context."""

from __future__ import annotations

import pytest

from pagedllm import cpu_kernels
from pagedllm.attention import cpu_backend
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
