"""Where the model runs. One Platform object per device type, resolved once, answers
what layers and the engine would otherwise re-ask on every call: which kernels exist
here, which dtype runs fastest, and how to set the process up.

- CpuPlatform (platforms/cpu/): C kernels built for this CPU at engine start, oneDNN
  linear layers, the dtype chosen by the CPU's bfloat16 support.
- CudaPlatform (platforms/cuda.py): Triton attention, PyTorch for the rest.

Layers ask `current_platform()` once, when they are built (under the model's default
device and dtype), and keep the functions it hands them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class StepClock:
    """When a worker last ran a model step, for work that should wait until the model
    is idle (the CPU KV pool's pre-faulting). idle_since: time.monotonic() at the end
    of the last step, 0.0 before the first, math.inf while a step runs."""

    idle_since: float = 0.0


class Platform:
    device_type: str

    def prepare_process(self) -> None:
        """Once per worker process, before the model is built."""

    def after_step(self) -> None:
        """In the worker, between two model steps (CPU: hands freed heap pages back now and then)."""

    def choose_dtype(self, checkpoint_dtype: str | None) -> tuple[str, str]:
        """dtype 'auto' for 16-bit (or GGUF) weights -> (dtype, why), for the start-up log."""
        raise NotImplementedError

    def process_weights_after_loading(self, model: torch.nn.Module) -> None:
        """Once the checkpoint is loaded: rearrange weights for this platform's kernels."""

    def attention_backend(self) -> ModuleType:
        from pagedllm.attention import get_attention_backend

        return get_attention_backend(self.device_type)

    def fused_ops(self, dtype: torch.dtype):
        """Fused norm / activation / rotary kernels for dtype, or None: the layers' PyTorch paths."""
        return None

    def linear(self, dtype: torch.dtype) -> Callable:
        """(x [T, in], weight [out, in], bias [out] | None) -> [T, out], as F.linear."""
        import torch.nn.functional as F

        return F.linear

    def allocate_kv_cache(self, shape: tuple[int, ...], dtype: torch.dtype, num_layers: int,
                          step_clock: StepClock) -> list[torch.Tensor]:
        """num_layers zeroed KV tensors of `shape` (CacheEngine's layout) on this device."""
        import torch

        return [torch.zeros(shape, dtype=dtype, device=self.device_type) for _ in range(num_layers)]

    def quantized_kernels(self):
        """Matmul and embedding lookup on GGUF-quantized weights (layers/quantization.py), or None."""
        return None

    def describe(self) -> str:
        return self.device_type


@functools.cache
def get_platform(device_type: str) -> Platform:
    if device_type == "cuda":
        from pagedllm.platforms.cuda import CudaPlatform

        return CudaPlatform()
    if device_type == "cpu":
        from pagedllm.platforms.cpu import CpuPlatform

        return CpuPlatform()
    raise ValueError(f"no platform for device type {device_type!r} (cpu, cuda)")


def current_platform() -> Platform:
    """The platform of torch's current default device (the model's, while it is built)."""
    import torch

    return get_platform(torch.get_default_device().type)
