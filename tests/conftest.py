"""Fixtures shared across test directories: the embedded model and its
transformers reference (loaded once per session: it takes ~30 s on 2 cores)."""

from __future__ import annotations

import os

import pytest
import torch

from pagedllm.config import resolve_model_path


@pytest.fixture(scope="session")
def embedded_gguf() -> str:
    return resolve_model_path(None)


@pytest.fixture(scope="session")
def hf_smollm2(embedded_gguf):
    """transformers' own GGUF loading of the embedded model, float32."""
    import transformers

    dirname, basename = os.path.split(embedded_gguf)
    return transformers.AutoModelForCausalLM.from_pretrained(dirname, gguf_file=basename,
                                                             dtype=torch.float32).eval()
