"""The C kernels for CPUs, built into one shared library on first use.

Sources (SOURCES): paged decode attention and the KV writer (attention/), fused
norm / activation / rotary and the small-batch GEMM (layers/). They are compiled
once per machine with the system C compiler (a couple of seconds, no torch
headers: the kernels take raw pointers through ctypes) and cached under
`$PAGEDLLM_CACHE_DIR/kernels`; without a compiler the callers use their PyTorch
paths. OpenMP comes from the libgomp torch already loaded, so both share one
thread pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

from pagedllm.config import cache_dir

logger = logging.getLogger(__name__)

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
SOURCES = tuple(os.path.join(_PACKAGE, *parts) for parts in (
    ("attention", "cpu_decode_attention.c"), ("attention", "cpu_write_kv.c"), ("layers", "cpu_fused_ops.c"),
    ("layers", "cpu_small_gemm.c")))
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]


def _cpu_signature() -> str:
    """-march=native binaries are only valid on the CPU they were built for."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


INT64, FLOAT = ctypes.c_int64, ctypes.c_float


def pointer(tensor) -> ctypes.c_void_p:
    """A tensor's data pointer, as the kernels take it."""
    return ctypes.c_void_p(tensor.data_ptr())


@functools.cache
def load_kernel_library() -> ctypes.CDLL | None:
    """The compiled kernels, building them on first use; None if they cannot be built."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found: the CPU kernels fall back to plain PyTorch")
        return None
    digest = hashlib.sha256(" ".join([compiler, *_FLAGS, _cpu_signature()]).encode())
    try:
        for source in SOURCES:
            with open(source, "rb") as f:
                digest.update(f.read())
    except OSError as e:  # an install without its package data
        logger.warning("CPU kernel source missing (%s): the CPU kernels fall back to plain PyTorch", e)
        return None
    library = os.path.join(cache_dir(), "kernels", digest.hexdigest()[:16], "libpagedllm_cpu.so")
    if not os.path.isfile(library):
        os.makedirs(os.path.dirname(library), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(library)) as tmp:
            built = os.path.join(tmp, "lib.so")
            result = subprocess.run([compiler, *_FLAGS, *SOURCES, "-o", built, "-lm"], capture_output=True,
                                    text=True)
            if result.returncode != 0:
                logger.warning("building the CPU kernels failed, using plain PyTorch:\n%s", result.stderr)
                return None
            os.replace(built, library)  # atomic: concurrent builders never see a partial file
    lib = ctypes.CDLL(library)
    lib.paged_decode_attention_f32.restype = ctypes.c_int
    for name in ("rms_norm_f32", "add_rms_norm_f32", "silu_and_mul_f32", "rotary_f32", "small_gemm_f32",
                 "write_kv_f32"):
        getattr(lib, name).restype = None
    return lib
