"""Qwen2 with rope scaling against transformers: YaRN with prompts and generations
crossing original_max_position_embeddings (both config.json dialects), and dynamic NTK
within max_position_embeddings (the context served; see pagedllm/layers/rotary.py)."""

import json
import os
import shutil

import pytest
from transformers import Qwen2Config, Qwen2ForCausalLM

from pagedllm.config import ModelConfig
from tests.models.helpers import assert_matches_reference, make_llm, make_prompts, save_hf_model, tiny_kwargs

ROPE_THETA = 10000.0
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
CASES = {
    "yarn": {**YARN, "rope_theta": ROPE_THETA},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": ROPE_THETA},
}
# The first (also run through transformers' own greedy loop) is prefilled in chunks across position 32;
# 70 + 32 generated tokens stay within max_position_embeddings (128).
PROMPT_LENGTHS = (45, 7, 70)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (folder, HF model), written on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            config = Qwen2Config(**tiny_kwargs(rope_parameters=dict(CASES[name])))
            cache[name] = folder, save_hf_model(folder, Qwen2ForCausalLM, config)
        return cache[name]
    return get


@pytest.mark.parametrize("name", sorted(CASES))
def test_mixed_batch(hf_models, name):
    folder, hf_model = hf_models(name)
    assert hf_model.config.rope_parameters["rope_type"] == name
    assert_matches_reference(make_llm(folder), hf_model, make_prompts(PROMPT_LENGTHS))


def test_yarn_transformers_4_config_dialect(hf_models, tmp_path):
    """Qwen2.5's published form: `rope_scaling` with `type`, `rope_theta` beside it."""
    folder, hf_model = hf_models("yarn")
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    rope = config.pop("rope_parameters")
    rope["type"] = rope.pop("rope_type")
    config.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope, torch_dtype=config.pop("dtype"),
                  transformers_version="4.46.0")
    for name in os.listdir(folder):
        if name != "config.json":
            shutil.copy(os.path.join(folder, name), tmp_path)
    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        json.dump(config, f)
    assert_matches_reference(make_llm(tmp_path), hf_model, make_prompts(PROMPT_LENGTHS, seed=1)[2:])


@pytest.mark.parametrize("name, context_length", [("yarn", 128), ("dynamic", 256)])
def test_context_length_is_stretched_as_vllm_derives_it(hf_models, name, context_length):
    """YaRN: original_max_position_embeddings x factor (here 32 x 4); dynamic NTK:
    max_position_embeddings x factor (128 x 2)."""
    folder, _ = hf_models(name)
    assert ModelConfig.create(str(folder), dtype="float32").max_model_len == context_length
