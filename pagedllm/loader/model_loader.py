"""Build the model for a ModelConfig and fill it from its checkpoint."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from pagedllm.config import ModelConfig
from pagedllm.models.registry import get_model_class


def iter_checkpoint(model_config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    if model_config.is_gguf:
        from pagedllm.loader.gguf_loader import iter_gguf_weights

        return iter_gguf_weights(model_config.path)
    from pagedllm.loader.hf_loader import iter_hf_weights

    return iter_hf_weights(model_config.path)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(model_config: ModelConfig) -> nn.Module:
    """Construct directly in the target dtype and device (no float32 copy of the
    whole model first), then stream the checkpoint into it."""
    model_class = get_model_class(model_config.architecture)
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype(model_config.dtype))
    try:
        with torch.device(model_config.device):
            model = model_class(model_config.hf_config)
    finally:
        torch.set_default_dtype(previous_dtype)
    model.load_weights(iter_checkpoint(model_config))
    return model.eval()
