"""The KV block tensors of one worker."""

from __future__ import annotations

import torch

from pagedllm.platforms import StepClock, get_platform


class CacheEngine:
    """One tensor per layer: [2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str, step_clock: StepClock) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
        self.kv_caches = get_platform(device).allocate_kv_cache(shape, dtype, num_layers, step_clock)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        element_size = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element_size
