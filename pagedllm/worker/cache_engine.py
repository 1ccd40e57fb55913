"""The KV block tensors of one worker."""

from __future__ import annotations

import mmap

import numpy as np
import torch


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    """Zeroed KV memory. On CPU it is an anonymous mapping: zero pages the OS fills on
    first touch, so a 4 GiB pool costs nothing at start-up, where torch.zeros would write
    every byte (seconds). Not numpy's zeros: numpy advises transparent huge pages for
    large arrays, and where the kernel then compacts memory to fault in 2 MiB pages, a
    first touch costs ~6x more (measured on this workplace's VMs: 2.5 s against 0.43 s a
    GiB), paid by the steps that fill fresh blocks."""
    if device != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    element_size = torch.empty((), dtype=dtype).element_size()
    num_bytes = element_size * int(np.prod(shape))
    # The numpy view keeps the mapping alive as long as the tensor.
    memory = mmap.mmap(-1, max(num_bytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.from_numpy(np.frombuffer(memory, dtype=np.uint8, count=num_bytes)).view(dtype).view(shape)


class CacheEngine:
    """One tensor per layer: [2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
        self.kv_caches = [_zeros(shape, dtype, device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        element_size = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element_size
