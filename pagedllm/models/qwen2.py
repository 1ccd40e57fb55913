"""Qwen2 (HF `Qwen2ForCausalLM`: Qwen1.5, Qwen2, Qwen2.5) and Qwen3
(`Qwen3ForCausalLM`).

Qwen2 is Llama with a bias on the Q/K/V projections; Qwen3 drops that bias and
RMS-normalizes each query and key head (`q_norm`, `k_norm`, over head_dim)
before the rotary embedding. Both may use a sliding window on the layers from
`max_window_layers` on when `use_sliding_window` is set.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.layers.norm import RMSNorm
from pagedllm.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from pagedllm.models.utils import layer_sliding_window


def _qwen_sliding_window(config: SimpleNamespace, layer_index: int) -> int | None:
    sliding = bool(getattr(config, "use_sliding_window", False)) and \
        layer_index >= getattr(config, "max_window_layers", 0)
    return layer_sliding_window(config, layer_index, sliding)


def qwen2_layer(config: SimpleNamespace, layer_index: int) -> LlamaDecoderLayer:
    attention = LlamaAttention(config, qkv_bias=True, sliding_window=_qwen_sliding_window(config, layer_index))
    return LlamaDecoderLayer(config, attention, LlamaMLP(config.hidden_size, config.intermediate_size))


class Qwen2ForCausalLM(LlamaForCausalLM):
    make_layer = staticmethod(qwen2_layer)


class Qwen3Attention(LlamaAttention):
    """Llama attention with per-head RMSNorm of queries and keys before RoPE."""

    def __init__(self, config: SimpleNamespace, sliding_window: int | None) -> None:
        bias = getattr(config, "attention_bias", False)
        super().__init__(config, qkv_bias=bias, o_bias=bias, sliding_window=sliding_window)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        num_tokens, head_dim = q.shape[0], self.attn.head_dim
        # Dense copies: as column slices of QKV they are only dense for one token, and the fused
        # norm (CPU) takes dense rows: every batch size then normalizes with the same kernel.
        q = self.q_norm(q.reshape(num_tokens, -1, head_dim).contiguous())
        k = self.k_norm(k.reshape(num_tokens, -1, head_dim).contiguous())
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q.reshape(num_tokens, -1), k.reshape(num_tokens, -1), v, kv_cache, metadata)
        return self.o_proj(out)


def qwen3_layer(config: SimpleNamespace, layer_index: int) -> LlamaDecoderLayer:
    attention = Qwen3Attention(config, _qwen_sliding_window(config, layer_index))
    return LlamaDecoderLayer(config, attention, LlamaMLP(config.hidden_size, config.intermediate_size))


class Qwen3ForCausalLM(LlamaForCausalLM):
    make_layer = staticmethod(qwen3_layer)
