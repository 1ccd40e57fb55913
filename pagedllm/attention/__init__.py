"""Paged attention backends. Each backend is a module with the same two functions:
`write_kv(key, value, kv_cache, slot_mapping)` and
`paged_attention(query, kv_cache, metadata, scale, sliding_window, alibi_slopes, logits_soft_cap)`.

- "torch": plain PyTorch, every device; the correctness baseline.
- "cpu": a compiled C kernel for decode tokens on CPU (pagedllm.platforms.cpu.attention), torch
  for the rest.
- "triton": Triton kernels (CUDA; on CPU only under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os
from types import ModuleType

BACKENDS = ("torch", "cpu", "triton")
ENV_VAR = "PAGEDLLM_ATTENTION_BACKEND"


def get_attention_backend(device: str, name: str | None = None) -> ModuleType:
    """The backend module for `device` ("cpu", "cuda", "cuda:1", ...).

    `name` picks one explicitly; otherwise the environment variable
    PAGEDLLM_ATTENTION_BACKEND does; otherwise triton on CUDA when it imports,
    the cpu backend on CPU. An explicit choice that cannot load raises.
    """
    name = name or os.environ.get(ENV_VAR) or None
    if name is None:
        if str(device).startswith("cuda"):
            try:
                return _load("triton")
            except ImportError:
                return _load("torch")
        return _load("cpu")
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    return _load(name)


def _load(name: str) -> ModuleType:
    # Imported lazily: importing triton_backend decorates its kernels, and the
    # interpreter (TRITON_INTERPRET=1) must be chosen before that happens.
    if name == "triton":
        from pagedllm.attention import triton_backend
        return triton_backend
    if name == "cpu":
        from pagedllm.platforms.cpu import attention
        return attention
    from pagedllm.attention import torch_backend
    return torch_backend
