"""Llama (HF `LlamaForCausalLM`): Llama 1/2/3, SmolLM and checkpoints of that shape.

The building blocks here (attention, MLP, decoder layer, weight loading) are
shared by the Llama-like families in this package; they differ only in the
flags passed to them.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace

import torch
from torch import nn

from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.layers.activation import SiluAndMul
from pagedllm.layers.attention import Attention
from pagedllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagedllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.rotary import get_rotary_embedding

# (fused parameter, checkpoint name, shard id): checkpoints store q/k/v and
# gate/up separately, the model computes each group with one matmul.
LLAMA_STACKED_PARAMS = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, act=None) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)
        self.act = act or SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(self, config: SimpleNamespace, qkv_bias: bool = False, o_bias: bool = False,
                 sliding_window: int | None = None, use_rope: bool = True) -> None:
        super().__init__()
        head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=qkv_bias)
        num_heads, num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size, bias=o_bias,
                                        input_shard=(self.qkv_proj.heads.q_start * head_dim, self.q_size))
        self.rotary_emb = get_rotary_embedding(head_dim, config.max_position_embeddings, config.rope_theta,
                                               config.rope_scaling) if use_rope else None
        self.attn = Attention(num_heads, head_dim, num_kv_heads, scale=head_dim ** -0.5,
                              sliding_window=sliding_window)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)  # [T, (H + 2 Hkv) * D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.rotary_emb is not None:
            num_tokens, head_dim = q.shape[0], self.attn.head_dim
            q, k = self.rotary_emb(positions, q.view(num_tokens, -1, head_dim), k.view(num_tokens, -1, head_dim))
        out = self.attn(q.reshape(q.shape[0], -1), k.reshape(k.shape[0], -1), v, kv_cache, metadata)
        return self.o_proj(out)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: SimpleNamespace, attention: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = attention
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def norm_and_attend(self, positions, hidden_states, residual, kv_cache, metadata):
        """Input norm (with the previous layer's residual add fused in), then
        attention: returns (attention output, residual)."""
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        return self.self_attn(positions, hidden_states, kv_cache, metadata), residual

    def forward(self, positions, hidden_states, residual, kv_cache, metadata):
        """Returns (mlp output, residual); the next layer adds them in its first norm."""
        hidden_states, residual = self.norm_and_attend(positions, hidden_states, residual, kv_cache, metadata)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


def llama_layer(config: SimpleNamespace, layer_index: int) -> LlamaDecoderLayer:
    bias = getattr(config, "attention_bias", False)
    attention = LlamaAttention(config, qkv_bias=bias, o_bias=bias)
    mlp = LlamaMLP(config.hidden_size, config.intermediate_size, bias=getattr(config, "mlp_bias", False))
    return LlamaDecoderLayer(config, attention, mlp)


class LlamaModel(nn.Module):
    def __init__(self, config: SimpleNamespace, make_layer=llama_layer) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(make_layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # The platform's runner of all layers in one call for the decode steps it takes
        # (CPU: platforms/cpu/decode_stack.py), set once the weights are loaded; None: the layers.
        self.decode_stack = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                metadata: AttentionMetadata) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        stack = self.decode_stack
        if stack is not None and stack.takes(hidden_states, kv_caches, metadata):
            hidden_states, residual = stack(hidden_states, positions, kv_caches, metadata)
        else:
            residual = None
            for layer, kv_cache in zip(self.layers, kv_caches):
                hidden_states, residual = layer(positions, hidden_states, residual, kv_cache, metadata)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    stacked_params = LLAMA_STACKED_PARAMS
    make_layer = staticmethod(llama_layer)

    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.make_layer)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.tie(self.model.embed_tokens)

    def forward(self, input_ids, positions, kv_caches, metadata) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden]."""
        return self.model(input_ids, positions, kv_caches, metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] (float32)."""
        return self.lm_head.compute_logits(hidden_states).float()

    def checkpoint_name(self, name: str) -> str | None:
        """Map a checkpoint tensor name to this model's; None = not a parameter."""
        if "rotary_emb.inv_freq" in name:
            return None
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return None
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_stacked_weights(self, weights, self.stacked_params)


def load_stacked_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                         stacked_params) -> None:
    """Copy checkpoint tensors into the model through each parameter's weight
    loader; fused parameters take their pieces by shard id. Every parameter must
    be loaded exactly as the checkpoint has it, or this raises."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for checkpoint_name, tensor in weights:
        name = model.checkpoint_name(checkpoint_name)
        if name is None:
            continue
        shard_id = None
        for fused, piece, shard in stacked_params:
            if f".{piece}." in name:
                name, shard_id = name.replace(f".{piece}.", f".{fused}."), shard
                break
        param = params.get(name)
        if param is None:
            raise ValueError(f"checkpoint tensor {checkpoint_name!r} matches no parameter of "
                             f"{type(model).__name__}")
        param.weight_loader(param, tensor, shard_id) if shard_id is not None else _load_whole(param, tensor)
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"the checkpoint lacks weights for {len(missing)} parameters of "
                         f"{type(model).__name__}, e.g. {missing[:5]}")


def _load_whole(param: nn.Parameter, tensor: torch.Tensor) -> None:
    loader = getattr(param, "weight_loader", None)
    if loader is not None:
        loader(param, tensor)
        return
    if param.shape != tensor.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
    param.data.copy_(tensor)
