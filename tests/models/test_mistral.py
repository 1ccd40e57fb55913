"""Mistral: Llama with sliding-window attention, exact on the paged cache."""

import pytest
from transformers import MistralConfig
from transformers import MistralForCausalLM as HFMistral

from tests.models.helpers import (BLOCK_SIZE, MAX_BATCHED_TOKENS, PROMPT_LENGTHS, assert_matches_reference,
                                  make_llm, make_prompts, save_hf_model, tiny_kwargs)

# Not a multiple of the block size; shorter than the prefill chunks and than all
# prompts but the first, which outgrows it while decoding.
SLIDING_WINDOW = 10


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mistral")
    hf_model = save_hf_model(folder, HFMistral, MistralConfig(**tiny_kwargs(sliding_window=SLIDING_WINDOW)))
    return make_llm(folder), hf_model


def test_window_is_shorter_than_the_sequences():
    assert SLIDING_WINDOW % BLOCK_SIZE
    assert PROMPT_LENGTHS[0] < SLIDING_WINDOW < min(PROMPT_LENGTHS[1:] + (MAX_BATCHED_TOKENS,))


def test_batch_of_one(mistral):
    llm, reference = mistral
    assert_matches_reference(llm, reference, make_prompts()[2:])


def test_mixed_batch(mistral):
    llm, reference = mistral
    assert_matches_reference(llm, reference, make_prompts(seed=1))
