"""Where pagedllm keeps files on this machine. A module of its own so that the loaders
and the kernel builder take it without importing config.py (which imports them)."""

from __future__ import annotations

import os


def cache_dir() -> str:
    """Where pagedllm keeps what it derives once per machine (converted GGUF
    configs, tokenizers and weights, compiled kernels)."""
    return os.environ.get("PAGEDLLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pagedllm")
