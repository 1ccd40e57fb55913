"""dtype 'auto' on CPUs: float32 without native bfloat16 math, else the dtype whose
linear layers measured faster on this CPU."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from pagedllm.config import ModelConfig
from pagedllm.platforms import get_platform
from pagedllm.platforms.cpu import CpuPlatform
from pagedllm.platforms.cpu.dtype import measured_linear_seconds
from pagedllm.platforms.cpu.isa import cpu_features

NATIVE = {"avx512_bf16", "amx_bf16"}


def test_without_native_bfloat16_float32_is_chosen_unmeasured():
    features = dataclasses.replace(cpu_features(), flags=cpu_features().flags - NATIVE)
    dtype, why = CpuPlatform(features).choose_dtype("bfloat16")
    assert dtype == "float32" and "no native bfloat16" in why


@pytest.mark.skipif(not cpu_features().native_bf16, reason="this CPU has no AVX512-BF16 or AMX")
def test_with_native_bfloat16_the_measured_faster_dtype_is_chosen():
    platform = CpuPlatform()
    seconds = measured_linear_seconds(platform)
    assert set(seconds) == {"float32", "bfloat16"} and all(s > 0 for s in seconds.values())
    dtype, why = platform.choose_dtype("bfloat16")
    assert dtype == min(seconds, key=seconds.get)
    assert "measured" in why


def test_auto_logs_the_choice_and_why(embedded_gguf, caplog):
    with caplog.at_level(logging.INFO, logger="pagedllm.config"):
        config = ModelConfig.create(embedded_gguf, dtype="auto", device="cpu")
    expected, why = get_platform("cpu").choose_dtype(None)
    assert config.dtype == expected
    assert f"dtype auto -> {expected}: {why}" in caplog.text
