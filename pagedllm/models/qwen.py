"""Qwen v1 (remote code on the Hub: `QWenLMHeadModel`, Qwen-1.8B/7B/14B/72B).

A Llama-shaped model under other names: `transformer.wte`, `transformer.h.N`
with `ln_1`/`ln_2`, attention `c_attn` (Q/K/V fused, with bias) and `c_proj`,
MLP `w1`/`w2`/`c_proj` where **w2 is the gate** (silu(w2 x) * w1 x), and
`transformer.ln_f`. config.json says `kv_channels` (head dim),
`layer_norm_epsilon`, `rotary_emb_base`, `seq_length`, `no_bias`, and
`intermediate_size` is twice the MLP width. Dynamic NTK and log-n attention
scaling only act past `seq_length` and are not implemented.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace

import torch

from pagedllm.models.llama import (LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP,
                                   load_stacked_weights)
from pagedllm.models.utils import config_with, rename_checkpoint_name, unfuse_checkpoint

QWEN_RENAMES = (
    ("transformer.wte", "model.embed_tokens"),
    ("transformer.ln_f", "model.norm"),
    ("transformer.h", "model.layers"),
    ("ln_1", "input_layernorm"),
    ("ln_2", "post_attention_layernorm"),
    ("attn.c_proj", "self_attn.o_proj"),
    ("attn", "self_attn"),
    ("mlp.c_proj", "mlp.down_proj"),
    ("mlp.w1", "mlp.up_proj"),
    ("mlp.w2", "mlp.gate_proj"),
)


def _llama_view(config: SimpleNamespace) -> SimpleNamespace:
    if getattr(config, "rotary_pct", 1.0) != 1.0:
        raise ValueError(f"Qwen rotary_pct={config.rotary_pct} (partial rotary embedding) is not supported")
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "seq_length", 8192)
    return config_with(
        config, rms_norm_eps=config.layer_norm_epsilon, rope_theta=getattr(config, "rotary_emb_base", 10000.0),
        head_dim=getattr(config, "kv_channels", None) or config.head_dim,
        intermediate_size=config.intermediate_size // 2, max_position_embeddings=max_positions,
        num_key_value_heads=config.num_attention_heads)


def qwen_layer(config: SimpleNamespace, layer_index: int) -> LlamaDecoderLayer:
    bias = not getattr(config, "no_bias", True)
    attention = LlamaAttention(config, qkv_bias=True, o_bias=bias)
    return LlamaDecoderLayer(config, attention, LlamaMLP(config.hidden_size, config.intermediate_size, bias=bias))


class QWenLMHeadModel(LlamaForCausalLM):
    make_layer = staticmethod(qwen_layer)

    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__(_llama_view(config))

    def checkpoint_name(self, name: str) -> str | None:
        return super().checkpoint_name(rename_checkpoint_name(name, QWEN_RENAMES))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        weights = unfuse_checkpoint(weights, "c_attn", ("q_proj", "k_proj", "v_proj"), lambda t: t.chunk(3))
        load_stacked_weights(self, weights, self.stacked_params)
