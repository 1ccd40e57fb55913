"""dtype 'auto' for 16-bit (and GGUF) weights on a CPU: measured, not assumed.

Without native bfloat16 math (AVX512-BF16 or AMX) oneDNN emulates it, and bfloat16
ran ~4x slower than float32 on an AVX-512 Skylake (workload W: 19.5 vs 75-84 output
tok/s), so such CPUs take float32 without measuring. Where the CPU has it, the two
dtypes' linear layers (what dominates a step) are timed on a decode-sized and a
prefill-sized matmul, the way the engine runs them, and the faster wins: on an AMX
Xeon bfloat16 took a quarter of float32's time.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

# (rows, in, out): a decode batch and a prefill chunk through a SmolLM2-sized MLP.
_SHAPES = ((32, 576, 3072), (512, 576, 3072))


def _seconds(linear: Callable, x, weight, repeats: int = 3) -> float:
    linear(x, weight)  # oneDNN compiles its kernel for the shape on first use
    start = time.perf_counter()
    for _ in range(repeats):
        linear(x, weight)
    return (time.perf_counter() - start) / repeats


@functools.cache
def measured_linear_seconds(platform) -> dict[str, float]:
    """Seconds of one pass over _SHAPES per dtype, through the platform's linear layers."""
    import torch

    from pagedllm.platforms.cpu.linear import pack_bfloat16_weights

    generator = torch.Generator().manual_seed(0)
    totals = {}
    for dtype in (torch.float32, torch.bfloat16):
        total = 0.0
        for rows, in_features, out_features in _SHAPES:
            layer = torch.nn.Module()
            layer.linear = platform.linear(dtype)
            layer.weight = torch.nn.Parameter(torch.randn(out_features, in_features, generator=generator).to(dtype),
                                              requires_grad=False)
            pack_bfloat16_weights(layer)
            x = torch.randn(rows, in_features, generator=generator).to(dtype)
            total += _seconds(layer.linear, x, layer.weight)
        totals[str(dtype).removeprefix("torch.")] = total
    return totals


def choose_cpu_dtype(platform) -> tuple[str, str]:
    """-> (dtype, why)."""
    features = platform.features
    if not features.native_bf16:
        return "float32", (f"this CPU has no native bfloat16 math ({features.isa}; no AVX512-BF16 or AMX): "
                           "emulated bfloat16 is slower than float32")
    seconds = measured_linear_seconds(platform)
    fastest = min(seconds, key=seconds.get)
    figures = ", ".join(f"{name} {1e3 * s:.2f} ms" for name, s in seconds.items())
    return fastest, f"measured the faster on this CPU ({features.isa}; linear layers: {figures})"
