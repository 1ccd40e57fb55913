"""keep_freed_memory: a CPU worker's prefill steps find their activation memory
mapped already instead of page-faulting it in again. FreedMemoryTrimmer: now and then
the heap's free pages go back to the kernel. populate_in_background: the KV pool is
faulted in once, keeping what steps wrote meanwhile."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import weakref

import psutil
import pytest
import torch

from pagedllm.platforms import StepClock
from pagedllm.platforms.cpu import memory

# 2048-token prefill steps of the embedded model in float32 (8 distinct prompts
# of 256 tokens each; no prefix caching, and a KV pool of 136 blocks, one step's
# 128 and a few: later steps rewrite blocks the first ones touched, so the pool's
# own first-touch faults stay out of the count): two to settle the heap, then
# prints the page faults of three more.
# float32, not the CPU's `auto` choice: bfloat16 activations are half as large
# and glibc's defaults already fault few of them in again (measured on an
# AVX-512 BF16 CI machine, where `auto` is bfloat16: 2567 kept, 7218 default).
_PROBE = """
import resource
from pagedllm import LLM, SamplingParams
from pagedllm.platforms.cpu import memory
memory.TRIM_INTERVAL_S = float("inf")  # what keeping does alone: on a slow CPU a trim would fall in between
llm = LLM(enable_prefix_caching=False, dtype="float32", max_model_len=512, num_kv_blocks=136)
params = SamplingParams(max_tokens=1, ignore_eos=True)
def prompts(offset):
    return [{"prompt_token_ids": [offset + 300 * i + t for t in range(256)]} for i in range(8)]
for offset in (1000, 4000):
    llm.generate(prompts(offset), params, use_tqdm=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for offset in (7000, 10000, 13000):
    llm.generate(prompts(offset), params, use_tqdm=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _prefill_step_faults(env: dict[str, str]) -> int:
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, check=True,
                            timeout=300)
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_prefill_steps_reuse_activation_memory():
    env = {k: v for k, v in os.environ.items() if k not in memory.USER_SETTINGS}
    kept = _prefill_step_faults(env)
    # Any malloc setting in the environment makes the worker leave malloc as it is.
    default = _prefill_step_faults({**env, "GLIBC_TUNABLES": "glibc.malloc.check=0"})
    # Measured: 0-6700 page faults kept (the heap now and then still grows once),
    # 24 000-660 000 by default (24 305 against 3840 kept in one full CI run).
    assert default > 4 * kept, (kept, default)


# 256 freed blocks of 1 MiB below a live one (so not at the heap's top, where even a
# trim threshold would return them): RSS before the trimmer's first interval has
# passed, after it has not, after it has.
_TRIM_PROBE = """
import ctypes, psutil
from pagedllm.platforms.cpu import memory
assert memory.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
blocks = [libc.malloc(1 << 20) for _ in range(256)]
for block in blocks:
    ctypes.memset(block, 1, 1 << 20)
live = libc.malloc(4096)
for block in blocks:
    libc.free(block)
rss = lambda: psutil.Process().memory_info().rss
trimmer = memory.FreedMemoryTrimmer()
before = rss()
trimmer.after_step()
too_soon = rss()
trimmer._last_trim -= memory.TRIM_INTERVAL_S
trimmer.after_step()
print(before, too_soon, rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_pages_go_back_once_an_interval():
    env = {k: v for k, v in os.environ.items() if k not in memory.USER_SETTINGS}
    result = subprocess.run([sys.executable, "-c", _TRIM_PROBE], capture_output=True, text=True, env=env,
                            check=True, timeout=120)
    before, too_soon, after = (int(value) for value in result.stdout.split()[-3:])
    assert abs(before - too_soon) < 16 << 20, "trimmed before its interval"
    assert before - after > 200 << 20, (before, after)


def _rss() -> int:
    return psutil.Process().memory_info().rss


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_POPULATE_WRITE)")
def test_kv_pool_is_faulted_in_without_losing_what_steps_wrote():
    tensors = [memory.zeroed_tensor((2, 1024, 16, 4, 64), torch.bfloat16) for _ in range(8)]  # 8 x 16 MiB
    tensors[3][0, 5] = 1.5  # a step storing K/V before the thread gets there
    before, clock = _rss(), StepClock()
    clock.idle_since = math.inf  # a step runs: the thread waits
    thread = memory.populate_in_background(tensors, clock)
    time.sleep(1)  # a wrong thread has faulted in pages by now (on a slow machine maybe not: never a false failure)
    assert _rss() - before < 16 << 20
    clock.idle_since = 0.0
    thread.join(timeout=300)
    assert not thread.is_alive()
    # Pages were mapped (the kernel at least 5.14; older ones leave the pool to first touch)
    # and nothing was written: the stored values stay, the rest stays zero.
    assert _rss() - before > 100 << 20
    assert (tensors[3][0, 5] == 1.5).all()
    tensors[3][0, 5] = 0
    assert all(not tensor.any() for tensor in tensors)


def test_populating_stops_once_the_pool_is_freed():
    tensors = [memory.zeroed_tensor((1 << 20,), torch.float32) for _ in range(64)]
    refs = [weakref.ref(tensor) for tensor in tensors]
    thread = memory.populate_in_background(tensors, StepClock())
    del tensors
    thread.join(timeout=300)
    assert not thread.is_alive() and all(ref() is None for ref in refs)
