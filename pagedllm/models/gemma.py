"""Gemma (HF `GemmaForCausalLM`) and Gemma 2 (`Gemma2ForCausalLM`).

Both: GeGLU MLP (tanh-approximated GELU), RMSNorm scaling by (1 + weight),
token embeddings multiplied by sqrt(hidden_size) rounded to the model dtype,
LM head tied to the embedding (unless the config unties it and the checkpoint
ships lm_head.weight). Gemma 2 adds a norm after attention and around
the MLP, soft-caps attention scores and final logits (cap * tanh(x / cap)),
scales queries by query_pre_attn_scalar^-0.5 and alternates sliding-window
(even) and global (odd) layers.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn

from pagedllm.layers.activation import GeluAndMul
from pagedllm.layers.norm import RMSNorm
from pagedllm.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from pagedllm.models.utils import layer_sliding_window

# transformers' activation name -> torch's GELU approximation
_GELU_APPROXIMATIONS = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu": "none"}


def _gemma_mlp(config: SimpleNamespace, activation: str) -> LlamaMLP:
    if activation not in _GELU_APPROXIMATIONS:
        raise ValueError(f"Gemma activation {activation!r} is not supported "
                         f"(supported: {', '.join(_GELU_APPROXIMATIONS)})")
    act = GeluAndMul(approximate=_GELU_APPROXIMATIONS[activation])
    return LlamaMLP(config.hidden_size, config.intermediate_size, act=act)


def gemma_layer(config: SimpleNamespace, layer_index: int) -> LlamaDecoderLayer:
    # Gemma 1 checkpoints say "gelu" (or hidden_activation) for the tanh approximation.
    activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "gelu")
    activation = "gelu_pytorch_tanh" if activation == "gelu" else activation
    bias = getattr(config, "attention_bias", False)
    attention = LlamaAttention(config, qkv_bias=bias, o_bias=bias)
    return LlamaDecoderLayer(config, attention, _gemma_mlp(config, activation))


class Gemma2DecoderLayer(LlamaDecoderLayer):
    """norm -> attention -> norm -> +residual -> norm -> MLP -> norm -> +residual."""

    def __init__(self, config: SimpleNamespace, attention: nn.Module, mlp: nn.Module) -> None:
        super().__init__(config, attention, mlp)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden_states, residual, kv_cache, metadata):
        hidden_states, residual = self.norm_and_attend(positions, hidden_states, residual, kv_cache, metadata)
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
        hidden_states = self.post_feedforward_layernorm(self.mlp(hidden_states))
        return hidden_states, residual


def gemma2_layer(config: SimpleNamespace, layer_index: int) -> Gemma2DecoderLayer:
    bias = getattr(config, "attention_bias", False)
    window = layer_sliding_window(config, layer_index, layer_index % 2 == 0)
    attention = LlamaAttention(config, qkv_bias=bias, o_bias=bias, sliding_window=window)
    attention.attn.scale = config.query_pre_attn_scalar ** -0.5
    attention.attn.logits_soft_cap = getattr(config, "attn_logit_softcapping", None)
    mlp = _gemma_mlp(config, getattr(config, "hidden_activation", None) or "gelu_pytorch_tanh")
    return Gemma2DecoderLayer(config, attention, mlp)


class GemmaForCausalLM(LlamaForCausalLM):
    make_layer = staticmethod(gemma_layer)
    # Gemma checkpoints usually store no lm_head.weight and no tie_word_embeddings key (which
    # transformers' Gemma configs default to true): load_model ties a head the checkpoint lacks.
    tie_without_lm_head = True

    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__(config)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight_offset = 1.0
        self.model.embed_tokens.register_forward_hook(_scale_embeddings)


def _scale_embeddings(module: nn.Module, args, embeddings: torch.Tensor) -> torch.Tensor:
    """x * sqrt(hidden_size), the factor rounded to the model dtype as in the reference."""
    normalizer = torch.tensor(math.sqrt(embeddings.shape[-1]), dtype=embeddings.dtype).item()
    return embeddings * normalizer


class Gemma2ForCausalLM(GemmaForCausalLM):
    make_layer = staticmethod(gemma2_layer)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden_states)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return logits if cap is None else cap * torch.tanh(logits / cap)
