"""CPUs: C kernels built for this CPU when an engine starts (kernels.py, csrc/),
paged decode attention reading the KV blocks in place (attention.py), fused
elementwise ops and the small-batch GEMM (fused.py, linear.py), matmuls on
GGUF-quantized weights (quantized.py), glibc malloc
settings and the KV pool's memory (memory.py), and dtype 'auto' measured on this CPU (dtype.py, isa.py)."""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable

from pagedllm.platforms import Platform
from pagedllm.platforms.cpu.isa import CpuFeatures, cpu_features

logger = logging.getLogger(__name__)


class CpuPlatform(Platform):
    device_type = "cpu"

    def __init__(self, features: CpuFeatures | None = None) -> None:
        self.features = features or cpu_features()

    @functools.cached_property
    def kernels(self) -> ctypes.CDLL | None:
        from pagedllm.platforms.cpu.kernels import load_kernel_library

        return load_kernel_library()

    def prepare_process(self) -> None:
        from pagedllm.platforms.cpu.memory import keep_freed_memory

        keep_freed_memory()
        self.kernels  # noqa: B018 -- built now, not inside the first step

    @functools.cached_property
    def _trimmer(self):
        from pagedllm.platforms.cpu.memory import FreedMemoryTrimmer

        return FreedMemoryTrimmer()

    def after_step(self) -> None:
        self._trimmer.after_step()

    def process_weights_after_loading(self, model) -> None:
        from pagedllm.platforms.cpu.decode_stack import DecodeStack
        from pagedllm.platforms.cpu.linear import pack_bfloat16_weights

        pack_bfloat16_weights(model)
        layers = getattr(model, "model", None)
        if hasattr(layers, "decode_stack"):  # a model that can hand its decode steps to one
            layers.decode_stack = DecodeStack.build(self.kernels, layers, self.quantized_kernels())

    def allocate_kv_cache(self, shape, dtype, num_layers, step_clock):
        from pagedllm.platforms.cpu.memory import populate_in_background, zeroed_tensor

        tensors = [zeroed_tensor(shape, dtype) for _ in range(num_layers)]
        populate_in_background(tensors, step_clock)
        return tensors

    def choose_dtype(self, checkpoint_dtype: str | None) -> tuple[str, str]:
        from pagedllm.platforms.cpu.dtype import choose_cpu_dtype

        return choose_cpu_dtype(self)

    def fused_ops(self, dtype):
        from pagedllm.platforms.cpu.fused import SUFFIXES

        if self.kernels is None or dtype not in SUFFIXES:
            return None
        return _fused_ops(self.kernels, dtype)

    def linear(self, dtype) -> Callable:
        import torch

        from pagedllm.platforms.cpu.linear import float32_linear, onednn_bucketed_linear

        if dtype == torch.float32:
            return float32_linear(self.kernels)
        if dtype == torch.bfloat16 and self.features.onednn_bf16:
            return onednn_bucketed_linear
        return super().linear(dtype)  # PyTorch's own: oneDNN's bfloat16 path would raise on this CPU

    @functools.cached_property
    def _quantized_kernels(self):
        from pagedllm.platforms.cpu.quantized import QuantizedKernels

        return QuantizedKernels(self.kernels) if self.kernels is not None else None

    def quantized_kernels(self):
        return self._quantized_kernels

    def describe(self) -> str:
        return f"cpu: {self.features.describe()}"


@functools.cache
def _fused_ops(lib: ctypes.CDLL, dtype):
    from pagedllm.platforms.cpu.fused import FusedOps

    return FusedOps(lib, dtype)
