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


@pytest.fixture(scope="module")
def ray_cluster() -> str:
    """A local Ray cluster of 2 CPUs for one test module (which is skipped without Ray);
    yields its address, for the processes the test starts to join (RAY_ADDRESS)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
