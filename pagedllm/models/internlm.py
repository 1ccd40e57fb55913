"""InternLM (remote code on the Hub): `InternLMForCausalLM` and
`InternLM2ForCausalLM`.

InternLM is Llama with biases on q/k/v/o (config `bias`). InternLM2 renames
everything (`tok_embeddings`, `attention.wqkv`/`wo`, `attention_norm`,
`ffn_norm`, `feed_forward.w1` gate / `w3` up / `w2` down, `output`) and fuses
Q/K/V per KV head: `wqkv` rows are [kv head][its q heads..., k, v][head_dim].
Dynamic-NTK rope scaling equals plain RoPE within max_position_embeddings, the
only range served here (scaling past it is not implemented).
"""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace

import torch

from pagedllm.models.llama import LlamaForCausalLM, load_stacked_weights
from pagedllm.models.utils import config_with, rename_checkpoint_name, unfuse_checkpoint

INTERNLM2_RENAMES = (
    ("tok_embeddings", "embed_tokens"),
    ("attention.wo", "self_attn.o_proj"),
    ("attention", "self_attn"),
    ("attention_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("feed_forward.w1", "mlp.gate_proj"),
    ("feed_forward.w3", "mlp.up_proj"),
    ("feed_forward.w2", "mlp.down_proj"),
    ("output", "lm_head"),
)


def _llama_view(config: SimpleNamespace) -> SimpleNamespace:
    """Biases from `bias`; InternLM's `rotary: {base, type}`."""
    rope_theta = config.rope_theta
    rotary = getattr(config, "rotary", None)
    if isinstance(rotary, dict):
        rope_theta = rotary.get("base", rope_theta)
    bias = bool(getattr(config, "bias", False))
    return config_with(config, attention_bias=bias, mlp_bias=False, rope_theta=rope_theta)


class InternLMForCausalLM(LlamaForCausalLM):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__(_llama_view(config))


class InternLM2ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__(_llama_view(config))

    def checkpoint_name(self, name: str) -> str | None:
        return super().checkpoint_name(rename_checkpoint_name(name, INTERNLM2_RENAMES))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        weights = unfuse_checkpoint(weights, "wqkv", ("q_proj", "k_proj", "v_proj"), self._split_wqkv)
        load_stacked_weights(self, weights, self.stacked_params)

    def _split_wqkv(self, wqkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[(Hkv * (G + 2)) * D, ...] grouped by KV head -> q [H * D, ...], k, v [Hkv * D, ...]."""
        config = self.config
        num_kv_heads, head_dim = config.num_key_value_heads, config.head_dim
        group = config.num_attention_heads // num_kv_heads
        grouped = wqkv.reshape(num_kv_heads, group + 2, head_dim, *wqkv.shape[1:])
        q = grouped[:, :group].reshape(num_kv_heads * group * head_dim, *wqkv.shape[1:])
        k = grouped[:, group].reshape(num_kv_heads * head_dim, *wqkv.shape[1:])
        v = grouped[:, group + 1].reshape(num_kv_heads * head_dim, *wqkv.shape[1:])
        return q, k, v
