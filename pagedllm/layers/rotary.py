"""Rotary position embedding (RoPE), "rotate half" layout as in HF Llama.

cos/sin are precomputed in float32 for every position the scaling is built for
(`scaled_max_positions`, vLLM's context for the scaling) and gathered by position each
step; the served context (config._context_length) is still max_position_embeddings.
Supported scalings: default, linear, llama3, yarn, dynamic (NTK).

yarn is transformers' `_compute_yarn_parameters`: each frequency is kept, divided by
`factor` or a blend of both, and cos/sin are scaled by the attention factor.

dynamic: transformers rescales the base on every forward for that call's length
(max position + 1), so a token's rotation would depend on what it is batched and
chunked with. vLLM builds one table for max_position_embeddings * factor with the base
scaled for that length at every position, which differs from transformers even for
short sequences. Here position p is rotated as transformers rotates it when it decodes
token p over its KV cache (length p + 1): plain RoPE up to max_position_embeddings,
which is transformers' rotation for any sequence that fits, and past it the base scaled
for length p + 1 (the last row is vLLM's). A prompt longer than max_position_embeddings
differs from transformers' one-shot forward, which scales every position for the full
length.
"""

from __future__ import annotations

import functools
import json
import math

import torch
from torch import nn

from pagedllm.platforms import current_platform

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


def scaled_max_positions(max_position: int, scaling: dict | None) -> int:
    """Positions the rotary table covers, vLLM's lengths: yarn stretches the original
    context by `factor`, dynamic NTK stretches max_position_embeddings by `factor`."""
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "yarn":
        factor, original = _yarn_factor_and_original(max_position, scaling)
        return max(max_position, int(original * factor))
    if rope_type == "dynamic":
        return max(max_position, int(max_position * scaling["factor"]))
    return max_position


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


def _yarn_factor_and_original(max_position: int, scaling: dict) -> tuple[float, int]:
    original = scaling.get("original_max_position_embeddings") or max_position
    factor = scaling.get("factor")
    if factor is None:  # DeepSeek-V3 style: the stretch is max_position_embeddings over the pretrained context
        factor = max_position / original
    return factor, original


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(pos_freqs: torch.Tensor, base: float, max_position: int,
                   scaling: dict) -> tuple[torch.Tensor, float]:
    """pos_freqs [dim / 2] (base^(2i / dim)) -> (inv_freq [dim / 2], attention factor), as
    transformers computes them: frequencies that turn more than beta_fast times in the
    original context are kept, fewer than beta_slow times divided by `factor`, a linear
    ramp over the dimensions in between."""
    dim = 2 * pos_freqs.numel()
    factor, original = _yarn_factor_and_original(max_position, scaling)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        """The dimension whose wavelength fits num_rotations times in the original context."""
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # [dim / 2]: 1 keeps a frequency, 0 divides it by factor
    inv_freq = 1.0 / (factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation
    return inv_freq, float(attention_factor)


def _dynamic_ntk_freqs(base: float, dim: int, max_position: int, factor: float, num_positions: int) -> torch.Tensor:
    """Angles [num_positions - max_position, dim / 2] of positions max_position.. : position
    p with transformers' _compute_dynamic_ntk_parameters for sequence length p + 1."""
    positions = torch.arange(max_position, num_positions)
    seq_len = positions + 1
    scaled_base = base * ((factor * seq_len / max_position) - (factor - 1)) ** (dim / (dim - 2))  # [P]
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # [dim / 2]
    inv_freq = 1.0 / (scaled_base[:, None] ** exponents[None, :])  # [P, dim / 2]
    return positions.float()[:, None] * inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float, scaling: dict | None = None,
                 rotary_dim: int | None = None) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim or head_dim
        pos_freqs = base ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim)
        inv_freq = 1.0 / pos_freqs
        rope_type = (scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope scaling type {rope_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        attention_factor = 1.0
        if rope_type == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif rope_type == "yarn":
            inv_freq, attention_factor = _yarn_inv_freq(pos_freqs, base, max_position, scaling)
        num_positions = scaled_max_positions(max_position, scaling)
        freqs = torch.outer(torch.arange(num_positions, dtype=torch.float32), inv_freq)
        if rope_type == "dynamic" and num_positions > max_position:
            freqs[max_position:] = _dynamic_ntk_freqs(base, self.rotary_dim, max_position, scaling["factor"],
                                                      num_positions)
        emb = torch.cat((freqs, freqs), dim=-1)  # [num_positions, rotary_dim]
        self.register_buffer("cos_cache", emb.cos() * attention_factor, persistent=False)
        self.register_buffer("sin_cache", emb.sin() * attention_factor, persistent=False)
        self.fused = current_platform().fused_ops(torch.get_default_dtype())

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        """positions [T]; query [T, Hq, D], key [T, Hkv, D] -> rotated: in place on CPU
        (they are slices of this step's QKV output), else new tensors."""
        if self.fused and self.fused.rotary_(query, key, positions, self.cos_cache, self.sin_cache):
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
