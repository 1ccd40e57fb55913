"""Llama against transformers: MHA and GQA, tied and untied embeddings,
Llama 3 rope scaling, both config.json dialects (transformers 4.x
`rope_theta`/`rope_scaling`/`torch_dtype` and 5.x `rope_parameters`/`dtype`),
and the checkpoint formats (single and sharded safetensors, pytorch_model.bin)."""

import glob
import json
import os
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.models.helpers import (assert_matches_reference, make_llm, make_prompts, save_hf_model,
                                  tiny_kwargs)
from tests.tiny_models import save_byte_tokenizer

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
CONFIGS = {
    "gqa_untied": tiny_kwargs(num_key_value_heads=2, tie_word_embeddings=False),
    "mha_tied": tiny_kwargs(num_key_value_heads=4, tie_word_embeddings=True),
    "llama3_rope": tiny_kwargs(rope_parameters=dict(LLAMA3_ROPE, rope_theta=50000.0)),
}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (folder, HF model), written on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            cache[name] = folder, save_hf_model(folder, LlamaForCausalLM, LlamaConfig(**CONFIGS[name]), seed=len(cache))
        return cache[name]
    return get


@pytest.fixture(scope="module")
def gqa_llm(hf_models):
    folder, hf_model = hf_models("gqa_untied")
    return make_llm(folder), hf_model


def test_batch_of_one(gqa_llm):
    llm, reference = gqa_llm
    assert_matches_reference(llm, reference, make_prompts()[2:])


def test_mixed_batch(gqa_llm):
    llm, reference = gqa_llm
    assert_matches_reference(llm, reference, make_prompts(seed=1))


@pytest.mark.parametrize("name", ["mha_tied", "llama3_rope"])
def test_mixed_batch_variants(hf_models, name):
    folder, hf_model = hf_models(name)
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["tie_word_embeddings"] == CONFIGS[name]["tie_word_embeddings"]
    assert_matches_reference(make_llm(folder), hf_model, make_prompts(seed=2))


def _copy_with(source, target, patterns) -> None:
    os.makedirs(target, exist_ok=True)
    for pattern in patterns:
        for path in glob.glob(os.path.join(source, pattern)):
            shutil.copy(path, target)


def test_transformers_4_config_dialect(hf_models, tmp_path):
    folder, hf_model = hf_models("llama3_rope")
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope, torch_dtype=config.pop("dtype"),
                  transformers_version="4.46.0")
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["rope_theta"] == 50000.0
    _copy_with(folder, tmp_path, ["*.safetensors", "tokenizer*", "*.jinja"])
    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        json.dump(config, f)
    assert_matches_reference(make_llm(tmp_path), hf_model, make_prompts(seed=3)[1:2])


def test_sharded_safetensors(hf_models, tmp_path):
    _, hf_model = hf_models("gqa_untied")
    hf_model.save_pretrained(str(tmp_path), max_shard_size="50KB")
    save_byte_tokenizer(str(tmp_path))
    assert os.path.isfile(os.path.join(tmp_path, "model.safetensors.index.json"))
    assert len(glob.glob(os.path.join(tmp_path, "*.safetensors"))) > 1
    assert_matches_reference(make_llm(tmp_path), hf_model, make_prompts(seed=4)[1:2])


def test_pytorch_bin(hf_models, tmp_path):
    folder, hf_model = hf_models("gqa_untied")
    _copy_with(folder, tmp_path, ["config.json", "tokenizer*", "*.jinja"])
    torch.save(hf_model.state_dict(), os.path.join(tmp_path, "pytorch_model.bin"))
    assert not glob.glob(os.path.join(tmp_path, "*.safetensors"))
    assert_matches_reference(make_llm(tmp_path), hf_model, make_prompts(seed=5)[1:2])
