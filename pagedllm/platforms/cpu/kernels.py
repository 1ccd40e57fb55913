"""The C kernels for CPUs, built into one shared library when an engine starts.

Sources (csrc/): paged decode and prefill attention, the KV writer, fused norm / activation /
rotary, the small-batch GEMM, the GEMMs on GGUF-quantized weights and the decode step's
layers run through them in one call. They are compiled once per machine with the
system C compiler (~20 s on 2 cores, no torch headers: the kernels take raw
pointers through ctypes) and cached under `$PAGEDLLM_CACHE_DIR/kernels`; without
a compiler the callers use their PyTorch paths. OpenMP comes from the libgomp
torch already loaded, so both share one thread pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

from pagedllm.paths import cache_dir
from pagedllm.platforms.cpu.isa import cpu_features

logger = logging.getLogger(__name__)

_SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
SOURCES = tuple(os.path.join(_SOURCE_DIR, name)
                for name in ("decode_attention.c", "prefill_attention.c", "write_kv.c", "fused_ops.c", "small_gemm.c", "quantized_gemm.c",
                                 "quantized_dot.c", "decode_stack.c"))
HEADERS = tuple(os.path.join(_SOURCE_DIR, name) for name in ("dots.h", "gguf_blocks.h", "kernels.h", "kv_elements.h"))
_COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC"]
# Linked without -ffast-math: with it GCC (before 13) adds crtfastmath.o, whose
# constructor turns on flush-to-zero / denormals-are-zero in the thread that
# loads the library: torch's float results would change process-wide, and that
# one thread of the pool would round differently from the others.
_LINK_FLAGS = ["-shared", "-fopenmp"]


INT64, FLOAT = ctypes.c_int64, ctypes.c_float


def pointer(tensor) -> ctypes.c_void_p:
    """A tensor's data pointer, as the kernels take it."""
    return ctypes.c_void_p(tensor.data_ptr())


def build_library(compiler: str, sources: Sequence[str], output: str, extra_flags: Sequence[str] = ()) -> str | None:
    """Compiles the sources, all at once (one compiler process each), into
    objects beside `output`, then links them into it. Returns None, or the
    compiler's error output."""
    objects = [f"{output}.{i}.o" for i in range(len(sources))]
    jobs = [subprocess.Popen([compiler, *_COMPILE_FLAGS, *extra_flags, "-c", source, "-o", obj],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for source, obj in zip(sources, objects)]
    errors = [out for job in jobs if (out := job.communicate()[0]) and job.returncode != 0]
    if errors:
        return "\n".join(errors)
    result = subprocess.run([compiler, *_LINK_FLAGS, *objects, "-o", output, "-lm"], capture_output=True,
                            text=True)
    if result.returncode != 0:
        return result.stderr or "link failed"
    return None


@functools.cache
def load_kernel_library() -> ctypes.CDLL | None:
    """The compiled kernels, building them if this CPU has no cached build; None if
    they cannot be built."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found: the CPU kernels fall back to plain PyTorch")
        return None
    # -march=native binaries are only valid on CPUs with the same features.
    digest = hashlib.sha256(" ".join([compiler, *_COMPILE_FLAGS, *_LINK_FLAGS, *sorted(cpu_features().flags)])
                            .encode())
    try:
        for source in (*SOURCES, *HEADERS):
            with open(source, "rb") as f:
                digest.update(f.read())
    except OSError as e:  # an install without its package data
        logger.warning("CPU kernel source missing (%s): the CPU kernels fall back to plain PyTorch", e)
        return None
    library = os.path.join(cache_dir(), "kernels", digest.hexdigest()[:16], "libpagedllm_cpu.so")
    if not os.path.isfile(library):
        logger.info("building the CPU kernels for this CPU (once; cached in %s)", os.path.dirname(library))
        os.makedirs(os.path.dirname(library), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(library)) as tmp:
            built = os.path.join(tmp, "lib.so")
            errors = build_library(compiler, SOURCES, built)
            if errors is not None:
                logger.warning("building the CPU kernels failed, using plain PyTorch:\n%s", errors)
                return None
            os.replace(built, library)  # atomic: concurrent builders never see a partial file
    lib = ctypes.CDLL(library)
    for name in ("paged_decode_attention", "paged_prefill_attention", "gguf_dequantize", "gguf_gemm", "gguf_gemm_int8",
                 "decode_stack_f32"):
        getattr(lib, name).restype = ctypes.c_int
    fused = [f"{op}_{suffix}" for op in ("rms_norm", "add_rms_norm", "silu_and_mul", "rotary")
             for suffix in ("f32", "bf16")]
    for name in (*fused, "small_gemm_f32", "write_kv"):
        getattr(lib, name).restype = None
    return lib
