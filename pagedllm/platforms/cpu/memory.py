"""Process memory of CPU workers: glibc malloc settings that keep freed activation
memory (and a periodic trim of what fragmentation leaves behind), and the KV pool's
anonymous mapping, faulted in by a background thread.

Activations. A forward pass allocates and frees activations of tens of MiB per layer
(a 2048-token chunk: [2048, 3072] float32 gate/up output = 24 MiB). glibc
serves blocks that large with mmap and returns them with munmap, so every
layer of every step page-faults its activations in again and the kernel zeroes
them, on the thread that should be running the model. Serving them from the
heap and not trimming it keeps the pages mapped for the next layer: a
prefill-heavy run of the embedded model (24 prompts of 256 tokens, runs
alternated) took 12.4-13.8 s instead of 13.9-15.1 s, with 0.26 M page faults
instead of 1.8 M. Peak RSS does not grow: the heap only keeps what was in
use at once.

The KV pool is an anonymous mapping (zero pages the kernel fills on first touch), so
a 4 GiB pool costs nothing at start-up, where torch.zeros would write every byte
(seconds). Not numpy's zeros: numpy advises transparent huge pages for large arrays,
and where the kernel then compacts memory to fault in 2 MiB pages, a first touch
costs ~6x more (measured on this workplace's VMs: 2.5 s against 0.43 s a GiB).
Left at that, the steps themselves would fault the pool in block by block as the
free-block queue cycles through all of it: a server's RSS then climbed for as long
as it took to use every block once (bfloat16 SmolLM2, the default 4 GiB pool: +800
MiB every 200 requests), which looks like a leak, and a pool the machine cannot back
failed long after start-up. So a background thread faults the whole pool in with
madvise(MADV_POPULATE_WRITE), which maps pages writable without writing them: K/V
that the first steps store meanwhile are kept (writing zeros would race with them).
It runs only while the model is idle (no step for QUIET_SECONDS), 4 MiB at a time, at
the lowest priority: faulting in costs 0.4-2.8 s a GiB of one core on this workplace's
VMs (4 GiB: 10-11 s), and running it beside the steps, even at nice 19, cost workload
W 9 % of its throughput (bfloat16, 446 against 491 output tok/s, means of four runs
alternated). A server that starts and waits for traffic has its pool mapped in
seconds; one loaded without a pause maps the rest as its steps touch it.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
import time
import weakref

import numpy as np
import torch

from pagedllm.platforms import StepClock

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts; the KV pool (a tensor of 100+ MiB per layer) stays mmapped
TRIM_THRESHOLD = 1 << 30
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Apply the settings above to this process; False where the C library has
    no mallopt (not glibc) or the user tuned malloc through the environment."""
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    applied = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not applied:
        logger.warning("mallopt refused the activation-memory settings; CPU steps will page-fault more")
    return applied


# How often the worker hands the heap's free pages back (FreedMemoryTrimmer), in seconds of stepping.
TRIM_INTERVAL_S = 10.0


class FreedMemoryTrimmer:
    """Keeping freed activations mapped has a price: as batch shapes change, the heap
    fragments (an activation larger than every free hole extends the heap, and the hole
    stays resident), so RSS crept up under mixed traffic, never to come down: a server
    soaked with 256 concurrent streams of random lengths grew by 68 MiB from the first
    half of the traffic to the second, all of it in the engine-core process. Every
    TRIM_INTERVAL_S, between two steps, malloc_trim(0) returns every whole free page of
    the heap to the kernel (MADV_DONTNEED), so RSS falls back to what is in use; only
    the next step faults its activations in again, once per interval."""

    def __init__(self) -> None:
        try:
            self._malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # not glibc
            self._malloc_trim = None
        self._last_trim = time.monotonic()

    def after_step(self) -> None:
        if self._malloc_trim is None or time.monotonic() - self._last_trim < TRIM_INTERVAL_S:
            return
        self._malloc_trim(0)
        self._last_trim = time.monotonic()


MADV_POPULATE_WRITE = 23  # linux/mman.h, Linux 5.14+
POPULATE_CHUNK_BYTES = 4 << 20  # between chunks the thread lets go of the pool, so it can be freed
QUIET_SECONDS = 0.2  # back-to-back steps are microseconds apart; arrivals a step or more


def zeroed_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor in its own anonymous mapping (see the module docstring)."""
    num_bytes = torch.empty((), dtype=dtype).element_size() * int(np.prod(shape))
    # The numpy view keeps the mapping alive as long as the tensor.
    memory = mmap.mmap(-1, max(num_bytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.from_numpy(np.frombuffer(memory, dtype=np.uint8, count=num_bytes)).view(dtype).view(shape)


def populate_in_background(tensors: list[torch.Tensor], step_clock: StepClock) -> threading.Thread | None:
    """Fault in the pages of tensors made by zeroed_tensor from a daemon thread, without
    changing their contents, while step_clock says the model is idle; stops early once
    they are freed. None where the C library has no madvise."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    refs = [weakref.ref(tensor) for tensor in tensors]
    thread = threading.Thread(target=_populate, args=(madvise, refs, step_clock), name="kv-pool-populate",
                              daemon=True)
    thread.start()
    return thread


def _populate(madvise, refs: list[weakref.ref], step_clock: StepClock) -> None:
    try:  # on Linux a thread id sets that thread's priority alone
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass
    started, populated = time.monotonic(), 0
    for ref in refs:
        tensor = ref()
        if tensor is None:
            return
        address, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        del tensor
        for offset in range(0, size, POPULATE_CHUNK_BYTES):
            while (wait := QUIET_SECONDS - (time.monotonic() - step_clock.idle_since)) > 0:
                time.sleep(min(wait, QUIET_SECONDS))
            tensor = ref()  # held through the call: the mapping cannot go away under it
            if tensor is None:
                return
            length = min(POPULATE_CHUNK_BYTES, size - offset)
            if madvise(address + offset, length, MADV_POPULATE_WRITE) != 0:
                logger.info("the KV pool is faulted in as it is used (madvise: %s)", os.strerror(ctypes.get_errno()))
                return
            del tensor
            populated += length
    logger.info("KV pool: %.2f GiB faulted in by a background thread while the model was idle, %.1f s after "
                "start-up", populated / (1 << 30), time.monotonic() - started)
