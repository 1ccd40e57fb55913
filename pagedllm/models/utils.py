"""Helpers shared by several model families: config views, per-layer sliding
windows, and the checkpoint-name plumbing of families whose tensor layout
differs from Llama's (renamed modules, fused Q/K/V tensors)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from types import SimpleNamespace

import torch


def config_with(config: SimpleNamespace, **overrides) -> SimpleNamespace:
    """A copy of `config` with some attributes replaced (the shared config is
    left untouched): how a family maps its own key names onto Llama's."""
    return SimpleNamespace(**{**vars(config), **overrides})


def layer_sliding_window(config: SimpleNamespace, layer_index: int, sliding_by_default: bool) -> int | None:
    """The attention window of one layer, or None for full attention.

    transformers 5 writes `layer_types` ("sliding_attention" | "full_attention");
    older configs leave the choice to the family, given here as
    `sliding_by_default` (Mistral: every layer; Gemma2: even layers; Qwen2/3:
    layers from `max_window_layers` on). Qwen's `use_sliding_window: false`
    turns windows off. A window as long as the context never masks anything
    and is dropped, so such layers keep the fast full-attention path.
    """
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        sliding = layer_types[layer_index] == "sliding_attention"
    else:
        sliding = sliding_by_default
    if not sliding or window >= getattr(config, "max_position_embeddings", window + 1):
        return None
    return window


def rename_checkpoint_name(name: str, renames: Sequence[tuple[str, str]]) -> str:
    """Replace whole dotted segments, in order: ("attn.c_proj", "self_attn.o_proj")
    rewrites `h.0.attn.c_proj.weight` but never `h.0.xattn.c_proj_x.weight`."""
    padded = f".{name}."
    for old, new in renames:
        padded = padded.replace(f".{old}.", f".{new}.")
    return padded[1:-1]


def unfuse_checkpoint(weights: Iterable[tuple[str, torch.Tensor]], fused: str, pieces: Sequence[str],
                      split: Callable[[torch.Tensor], Sequence[torch.Tensor]]
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Replace each checkpoint tensor `....{fused}.(weight|bias)` by its pieces
    (`split` returns them in the order of `pieces`), so fused checkpoints
    (Baichuan's W_pack, Qwen's c_attn, InternLM2's wqkv) load through the same
    per-shard weight loaders as separate q/k/v tensors, tensor-parallel included."""
    marker = f".{fused}."
    for name, tensor in weights:
        if marker not in name:
            yield name, tensor
            continue
        parts = split(tensor)
        if len(parts) != len(pieces):
            raise ValueError(f"{name}: expected {len(pieces)} pieces, got {len(parts)}")
        for piece, part in zip(pieces, parts):
            yield name.replace(marker, f".{piece}."), part
