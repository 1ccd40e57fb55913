"""What this CPU can do, read once: the vector ISA levels the kernels and the dtype
choice depend on, and the physical cores the threads should use."""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

@dataclass(frozen=True)
class CpuFeatures:
    model_name: str
    flags: frozenset[str]
    physical_cores: int

    @property
    def native_bf16(self) -> bool:
        """bfloat16 math in hardware: AVX512-BF16 dot products (vdpbf16ps) or AMX tiles.
        Without either, oneDNN emulates bfloat16 matmuls (measured 4x slower than
        float32 on an AVX-512 Skylake)."""
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags

    @property
    def onednn_bf16(self) -> bool:
        """Whether oneDNN's bfloat16 matmul and weight packing run here: they need AVX-512
        BW/VL/DQ or AVX-NE-CONVERT and raise on other CPUs (an AVX2-only EPYC)."""
        return {"avx512bw", "avx512vl", "avx512dq"} <= self.flags or "avx_ne_convert" in self.flags

    @property
    def isa(self) -> str:
        """The best level present, for logs and benchmark reports."""
        for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX-512"),
                           ("avx2", "AVX2")):
            if flag in self.flags:
                return name
        return platform.machine() or "unknown"

    def describe(self) -> str:
        return f"{self.model_name} ({self.isa}, {self.physical_cores} physical cores)"


def _physical_cores(cpuinfo: str) -> int:
    """Distinct (physical id, core id) pairs among the CPUs this process may run on."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cores, processor, physical = set(), None, "0"
    for line in cpuinfo.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "processor":
            processor = int(value)
        elif key == "physical id":
            physical = value
        elif key == "core id" and (allowed is None or processor in allowed):
            cores.add((physical, value))
    return len(cores) or len(allowed or ()) or os.cpu_count() or 1


@functools.cache
def cpu_features() -> CpuFeatures:
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    except OSError:  # not Linux: no flags, so the portable choices
        return CpuFeatures(platform.processor() or platform.machine(), frozenset(), os.cpu_count() or 1)
    fields = dict((part.strip() for part in line.partition(":")[::2]) for line in cpuinfo.splitlines()
                  if ":" in line)
    return CpuFeatures(fields.get("model name", platform.machine()), frozenset(fields.get("flags", "").split()),
                       _physical_cores(cpuinfo))
