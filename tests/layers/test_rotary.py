"""RoPE tables against transformers' rotary embeddings: YaRN (the Qwen2.5 and Qwen3
configs, mscale, beta and truncate overrides, an explicit attention factor, a factor
derived from max_position_embeddings when null, partial rotary) and dynamic NTK (exact within
max_position_embeddings; past it as transformers decodes, its last row vLLM's)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from pagedllm.config import normalize_hf_config
from pagedllm.layers.rotary import RotaryEmbedding, scaled_max_positions

HEADS, HEAD_DIM = 4, 64
YARN_CASES = {
    # Qwen2.5's recipe: the shipped context stretched 4x (max_position_embeddings stays the original)
    "qwen2.5": (64, 1e6, {"factor": 4.0, "original_max_position_embeddings": 64}),
    # Qwen3's: max_position_embeddings already past the original context
    "qwen3": (128, 1e6, {"factor": 4.0, "original_max_position_embeddings": 32}),
    "no_original": (64, 1e4, {"factor": 2.0}),
    "mscale": (640, 1e4, {"factor": 40.0, "original_max_position_embeddings": 16, "mscale": 1.0,
                          "mscale_all_dim": 0.5}),
    "betas_untruncated": (64, 1e4, {"factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16.0,
                                    "beta_slow": 2.0, "truncate": False, "attention_factor": 1.25}),
    "null_factor": (128, 1e4, {"factor": None, "original_max_position_embeddings": 32}),
}


def hf_config(max_positions: int, theta: float, scaling: dict | None, **kwargs) -> LlamaConfig:
    rope = dict(scaling or {"rope_type": "default"}, rope_theta=theta)
    return LlamaConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, max_position_embeddings=max_positions,
                       rope_parameters=rope, **kwargs)


def hf_cos_sin(rope: LlamaRotaryEmbedding, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' cos, sin [len(positions), rotary_dim] for one forward over `positions`."""
    cos, sin = rope(torch.zeros(1, dtype=torch.float32), positions[None])
    return cos[0], sin[0]


def ours(config: LlamaConfig, dialect: str = "5.x", rotary_dim: int | None = None) -> RotaryEmbedding:
    """Our table built from the config.json transformers writes, or its 4.x form."""
    raw = config.to_dict()
    if dialect == "4.x":
        rope = dict(raw.pop("rope_parameters"))
        raw["rope_theta"] = rope.pop("rope_theta")
        rope["type"] = rope.pop("rope_type")
        raw["rope_scaling"] = rope
    normalized = normalize_hf_config(raw)
    return RotaryEmbedding(HEAD_DIM, normalized.max_position_embeddings, normalized.rope_theta,
                           normalized.rope_scaling, rotary_dim)


def assert_table_equal(rope: RotaryEmbedding, cos: torch.Tensor, sin: torch.Tensor, rows: slice,
                       atol: float = 1e-6) -> None:
    torch.testing.assert_close(rope.cos_cache[rows], cos, rtol=0, atol=atol)
    torch.testing.assert_close(rope.sin_cache[rows], sin, rtol=0, atol=atol)


@pytest.mark.parametrize("dialect", ["5.x", "4.x"])
@pytest.mark.parametrize("name", sorted(YARN_CASES))
def test_yarn_equals_transformers(name, dialect):
    max_positions, theta, scaling = YARN_CASES[name]
    config = hf_config(max_positions, theta, dict(scaling, rope_type="yarn"))
    rope = ours(config, dialect)
    original = scaling.get("original_max_position_embeddings", max_positions)
    factor = scaling["factor"] or max_positions / original
    assert rope.cos_cache.shape == (max(max_positions, int(original * factor)), HEAD_DIM)
    # every row, the stretched context past max_position_embeddings included
    cos, sin = hf_cos_sin(LlamaRotaryEmbedding(config), torch.arange(rope.cos_cache.shape[0]))
    assert_table_equal(rope, cos, sin, slice(None))
    assert rope.cos_cache[0, 0] > 1.0  # cos(0) scaled by the attention factor


def test_yarn_partial_rotary_equals_transformers():
    config = hf_config(128, 1e4, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                       partial_rotary_factor=0.5)
    rope = ours(config, rotary_dim=HEAD_DIM // 2)
    cos, sin = hf_cos_sin(LlamaRotaryEmbedding(config), torch.arange(128))
    assert cos.shape == rope.cos_cache.shape == (128, HEAD_DIM // 2)
    assert_table_equal(rope, cos, sin, slice(None))


DYNAMIC = {"rope_type": "dynamic", "factor": 2.0}


@pytest.mark.parametrize("dialect", ["5.x", "4.x"])
def test_dynamic_ntk_within_max_positions_equals_transformers(dialect):
    config = hf_config(64, 1e4, dict(DYNAMIC))
    rope = ours(config, dialect)
    assert rope.cos_cache.shape == (128, HEAD_DIM)  # vLLM's length: max_position_embeddings * factor
    plain = RotaryEmbedding(HEAD_DIM, 64, 1e4)
    for length in (1, 37, 64):  # transformers rescales only for sequences longer than max_position_embeddings
        cos, sin = hf_cos_sin(LlamaRotaryEmbedding(config), torch.arange(length))
        assert_table_equal(rope, cos, sin, slice(length))
    assert torch.equal(rope.cos_cache[:64], plain.cos_cache)


def test_dynamic_ntk_past_max_positions_as_transformers_decodes():
    """Row p is what transformers' dynamic rope gives position p when it decodes it over its KV
    cache (a forward of that one position, length p + 1); the last row is vLLM's table, which
    scales the base for max_position_embeddings * factor; a one-shot transformers forward of a
    longer sequence scales every position for its full length instead."""
    max_positions, theta, factor = 64, 1e4, 2.0
    config = hf_config(max_positions, theta, dict(DYNAMIC, factor=factor))
    rope, hf_rope = ours(config), LlamaRotaryEmbedding(config)
    num_positions = rope.cos_cache.shape[0]
    for position in range(num_positions):  # increasing, as decoding grows the sequence
        cos, sin = hf_cos_sin(hf_rope, torch.tensor([position]))
        # the scaled base's float32 powers, batched here, round a few angles differently
        assert_table_equal(rope, cos, sin, slice(position, position + 1), atol=1e-5)

    # vLLM's DynamicNTKScalingRotaryEmbedding._compute_cos_sin_cache
    max_len = int(max_positions * factor)
    vllm_base = theta * (factor * max_len / max_positions - (factor - 1)) ** (HEAD_DIM / (HEAD_DIM - 2))
    vllm_inv_freq = 1.0 / vllm_base ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)
    angles = (max_len - 1) * vllm_inv_freq
    torch.testing.assert_close(rope.cos_cache[-1], torch.cat((angles, angles)).cos(), rtol=0, atol=1e-5)

    cos, _ = hf_cos_sin(LlamaRotaryEmbedding(config), torch.arange(100))  # one forward of 100 positions
    torch.testing.assert_close(rope.cos_cache[99], cos[99], rtol=0, atol=1e-5)
    assert not torch.allclose(rope.cos_cache[:99], cos[:99], atol=1e-3)


@pytest.mark.parametrize("scaling, expected", [
    (None, 100),
    ({"rope_type": "linear", "factor": 2.0}, 100),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 100}, 400),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 20}, 100),
    ({"rope_type": "dynamic", "factor": 2.5}, 250),
])
def test_scaled_max_positions(scaling, expected):
    assert scaled_max_positions(100, scaling) == expected


def test_unsupported_rope_type_names_the_supported_ones():
    with pytest.raises(ValueError, match="'longrope' is not supported .supported: default, linear, llama3, yarn, "
                                         "dynamic."):
        RotaryEmbedding(HEAD_DIM, 64, 1e4, {"rope_type": "longrope", "factor": 2.0})
