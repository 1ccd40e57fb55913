"""Rotary position embedding (RoPE), "rotate half" layout as in HF Llama.

cos/sin are precomputed for every position up to max_position in float32 and
gathered by position each step. Supported scalings: default, linear, llama3.
"""

from __future__ import annotations

import functools
import json
import math

import torch
from torch import nn

from pagedllm.layers import cpu_fused

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths divided by `factor`, short ones
    kept, a smooth interpolation in between."""
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float, scaling: dict | None = None,
                 rotary_dim: int | None = None) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim or head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float()
                                   / self.rotary_dim))
        rope_type = (scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope scaling type {rope_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        if rope_type == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_position, rotary_dim]
        self.register_buffer("cos_cache", emb.cos(), persistent=False)
        self.register_buffer("sin_cache", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        """positions [T]; query [T, Hq, D], key [T, Hkv, D] -> rotated: in place on CPU
        in float32 (they are slices of this step's QKV output), else new tensors."""
        if cpu_fused.rotary_(query, key, positions, self.cos_cache, self.sin_cache):
            return query, key
        cos = self.cos_cache[positions].unsqueeze(1).to(query.dtype)  # [T, 1, rotary_dim]
        sin = self.sin_cache[positions].unsqueeze(1).to(query.dtype)
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, passthrough = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        half = self.rotary_dim // 2
        rotated_half = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        out = rot * cos + rotated_half * sin
        return torch.cat((out, passthrough), dim=-1) if passthrough.numel() else out


def get_rotary_embedding(head_dim: int, max_position: int, base: float, scaling: dict | None = None,
                         rotary_dim: int | None = None) -> RotaryEmbedding:
    """One shared module per distinct configuration: every layer of a model uses
    the same cos/sin tables (30 copies of [max_position, dim] cost seconds and MBs)."""
    return _cached_rotary(head_dim, max_position, base, json.dumps(scaling, sort_keys=True), rotary_dim,
                          torch.get_default_dtype(), str(torch.empty(0).device))


@functools.lru_cache(maxsize=None)
def _cached_rotary(head_dim, max_position, base, scaling_json, rotary_dim, dtype, device) -> RotaryEmbedding:
    return RotaryEmbedding(head_dim, max_position, base, json.loads(scaling_json), rotary_dim)
