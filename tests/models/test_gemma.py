"""Gemma (GeGLU, (1 + w) RMSNorm, sqrt(hidden) embedding scale, tied head, MQA)
and Gemma 2 (pre/post norms, attention and final logit soft-capping,
query_pre_attn_scalar, alternating sliding window) against transformers; each
also with tie_word_embeddings false and its own lm_head."""

import os

import pytest
from safetensors import safe_open
from transformers import Gemma2Config, Gemma2ForCausalLM, GemmaConfig, GemmaForCausalLM

from tests.tiny_models import edit_json
from tests.models.helpers import assert_matches_reference, make_llm, make_prompts, save_hf_model, tiny_kwargs


def _gemma(tie: bool) -> tuple:
    return GemmaForCausalLM, GemmaConfig(**tiny_kwargs(num_key_value_heads=1, head_dim=16, tie_word_embeddings=tie))


def _gemma2(tie: bool) -> tuple:
    # Small caps so that both soft-cappings bite; layer 0 slides, layer 1 is global.
    return Gemma2ForCausalLM, Gemma2Config(**tiny_kwargs(
        head_dim=32, query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
        sliding_window=10, tie_word_embeddings=tie))


CASES = {"gemma": lambda: _gemma(True), "gemma-untied": lambda: _gemma(False),
         "gemma2": lambda: _gemma2(True), "gemma2-untied": lambda: _gemma2(False)}
# As Google publishes Gemma: neither lm_head.weight nor a tie_word_embeddings key.
KEYLESS = {"gemma"}


@pytest.fixture(scope="module", params=sorted(CASES))
def gemma(request, tmp_path_factory):
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    hf_model = save_hf_model(folder, *CASES[name]())
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
        assert ("lm_head.weight" in f.keys()) == name.endswith("-untied")
    if name in KEYLESS:
        edit_json(os.path.join(folder, "config.json"), lambda config: config.pop("tie_word_embeddings", None))
    return make_llm(folder), hf_model


def test_batch_of_one(gemma):
    llm, reference = gemma
    assert_matches_reference(llm, reference, make_prompts()[2:])


def test_mixed_batch(gemma):
    llm, reference = gemma
    assert_matches_reference(llm, reference, make_prompts(seed=1))
