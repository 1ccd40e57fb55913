"""The attention layer: store this step's K/V in the paged pool, then attend
through the block tables with the selected backend."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.platforms import current_platform


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float,
                 sliding_window: int | None = None, alibi_slopes: torch.Tensor | None = None,
                 logits_soft_cap: float | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)
        self.backend = current_platform().attention_backend()

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        """query [T, H*D], key/value [T, Hkv*D] -> [T, H*D]."""
        num_tokens = query.shape[0]
        query = query.view(num_tokens, self.num_heads, self.head_dim)
        key = key.view(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        self.backend.write_kv(key, value, kv_cache, metadata.slot_mapping)
        out = self.backend.paged_attention(query, kv_cache, metadata, self.scale, self.sliding_window,
                                           self.alibi_slopes, self.logits_soft_cap)
        return out.view(num_tokens, self.num_heads * self.head_dim)
