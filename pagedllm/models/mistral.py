"""Mistral (HF `MistralForCausalLM`): Llama with sliding-window attention.

Each query attends to the `sliding_window` most recent positions (itself
included), masked exactly on the paged cache by the attention backend.
"""

from __future__ import annotations

from types import SimpleNamespace

from pagedllm.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from pagedllm.models.utils import layer_sliding_window


def mistral_layer(config: SimpleNamespace, layer_index: int) -> LlamaDecoderLayer:
    attention = LlamaAttention(config, sliding_window=layer_sliding_window(config, layer_index, True))
    return LlamaDecoderLayer(config, attention, LlamaMLP(config.hidden_size, config.intermediate_size))


class MistralForCausalLM(LlamaForCausalLM):
    make_layer = staticmethod(mistral_layer)
