"""Baichuan (remote code on the Hub): `BaiChuanForCausalLM` is Baichuan-7B;
`BaichuanForCausalLM` is Baichuan-13B and Baichuan2-7B/13B.

Llama layers whose Q/K/V are stored fused in one `W_pack` tensor
[3 * hidden, hidden] (multi-head attention, no biases). The 7B models
(hidden_size 4096) use RoPE, the 13B models ALiBi. Baichuan2 (vocabulary of
125696) uses a "NormHead": the LM head's rows are L2-normalized, which is done
once here when the weights are loaded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from pagedllm.layers.alibi import local_alibi_slopes
from pagedllm.models.llama import (LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP,
                                   load_stacked_weights)
from pagedllm.models.utils import config_with, unfuse_checkpoint

BAICHUAN2_VOCAB_SIZE = 125696
ROPE_HIDDEN_SIZE = 4096  # Baichuan(2)-7B; the 13B models (5120) use ALiBi


class BaichuanForCausalLM(LlamaForCausalLM):
    def __init__(self, config: SimpleNamespace) -> None:
        # Baichuan-13B configs give the context length only as model_max_length.
        max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "model_max_length", 4096)
        super().__init__(config_with(config, max_position_embeddings=max_positions))

    @staticmethod
    def uses_alibi(config: SimpleNamespace) -> bool:
        return config.hidden_size != ROPE_HIDDEN_SIZE

    def make_layer(self, config: SimpleNamespace, layer_index: int) -> LlamaDecoderLayer:
        alibi = self.uses_alibi(config)
        attention = LlamaAttention(config, use_rope=not alibi)
        if alibi:
            attention.attn.alibi_slopes = local_alibi_slopes(config.num_attention_heads, attention.qkv_proj.heads)
        return LlamaDecoderLayer(config, attention, LlamaMLP(config.hidden_size, config.intermediate_size))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        weights = unfuse_checkpoint(weights, "W_pack", ("q_proj", "k_proj", "v_proj"), lambda t: t.chunk(3))
        if self.config.vocab_size == BAICHUAN2_VOCAB_SIZE:
            weights = _normalize_lm_head(weights)
        load_stacked_weights(self, weights, self.stacked_params)


class BaiChuanForCausalLM(BaichuanForCausalLM):
    """Baichuan-7B (the first release): always RoPE."""

    @staticmethod
    def uses_alibi(config: SimpleNamespace) -> bool:
        return False


def _normalize_lm_head(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        if name == "lm_head.weight":
            tensor = F.normalize(tensor.float(), dim=-1).to(tensor.dtype)
        yield name, tensor
