"""Gemma (GeGLU, (1 + w) RMSNorm, sqrt(hidden) embedding scale, tied head, MQA)
and Gemma 2 (pre/post norms, attention and final logit soft-capping,
query_pre_attn_scalar, alternating sliding window) against transformers."""

import pytest
from transformers import Gemma2Config, Gemma2ForCausalLM, GemmaConfig, GemmaForCausalLM

from tests.models.helpers import assert_matches_reference, engine_and_reference, make_prompts, tiny_kwargs

CASES = {
    "gemma": lambda: (GemmaForCausalLM, GemmaConfig(**tiny_kwargs(num_key_value_heads=1, head_dim=16,
                                                                  tie_word_embeddings=True))),
    # Small caps so that both soft-cappings bite; layer 0 slides, layer 1 is global.
    "gemma2": lambda: (Gemma2ForCausalLM, Gemma2Config(**tiny_kwargs(
        head_dim=32, query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
        sliding_window=10, tie_word_embeddings=True))),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def gemma(request, tmp_path_factory):
    return engine_and_reference(tmp_path_factory, request.param, *CASES[request.param]())


def test_batch_of_one(gemma):
    llm, reference = gemma
    assert_matches_reference(llm, reference, make_prompts()[2:])


def test_mixed_batch(gemma):
    llm, reference = gemma
    assert_matches_reference(llm, reference, make_prompts(seed=1))
