"""Build the model for a ModelConfig and fill it from its checkpoint."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from pagedllm.config import ModelConfig
from pagedllm.layers.quantization import finalize_quantized_weights
from pagedllm.models.registry import get_model_class
from pagedllm.models.utils import config_with
from pagedllm.platforms import get_platform


def iter_checkpoint(model_config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    if model_config.is_gguf:
        from pagedllm.loader.gguf_loader import iter_gguf_weights

        return iter_gguf_weights(model_config.path, quantized=model_config.quantization == "gguf")
    if model_config.hf_quantization is not None:
        from pagedllm.loader.hf_quantized import iter_hf_quantized_weights

        return iter_hf_quantized_weights(model_config.path, model_config.hf_quantization)
    from pagedllm.loader.hf_loader import iter_hf_weights

    return iter_hf_weights(model_config.path)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(model_config: ModelConfig) -> nn.Module:
    """Construct directly in the target dtype and device (no float32 copy of the
    whole model first), then stream the checkpoint into it."""
    model_class = get_model_class(model_config.architecture)
    hf_config = model_config.hf_config
    # A family whose checkpoints often omit both lm_head.weight and the tie key runs a head
    # it does not ship tied (a GGUF config already says whether output.weight is there).
    if (getattr(model_class, "tie_without_lm_head", False) and not hf_config.tie_word_embeddings
            and not model_config.is_gguf):
        from pagedllm.loader.hf_loader import checkpoint_tensor_names

        if "lm_head.weight" not in checkpoint_tensor_names(model_config.path):
            hf_config = config_with(hf_config, tie_word_embeddings=True)
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype(model_config.dtype))
    try:
        with torch.device(model_config.device):
            model = model_class(hf_config)
    finally:
        torch.set_default_dtype(previous_dtype)
    model.load_weights(iter_checkpoint(model_config))
    platform = get_platform(model_config.device)
    finalize_quantized_weights(model, platform.quantized_kernels())
    platform.process_weights_after_loading(model)
    return model.eval()
