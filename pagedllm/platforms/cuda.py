"""NVIDIA GPUs: Triton paged attention (attention/triton_backend.py), PyTorch for the rest."""

from __future__ import annotations

from pagedllm.platforms import Platform


class CudaPlatform(Platform):
    device_type = "cuda"

    def choose_dtype(self, checkpoint_dtype: str | None) -> tuple[str, str]:
        if checkpoint_dtype == "float16":
            return "float16", "the checkpoint's float16, native on CUDA"
        return "bfloat16", "16-bit weights run in bfloat16 on CUDA"

    def describe(self) -> str:
        import torch

        return f"cuda ({torch.cuda.get_device_name()})"
