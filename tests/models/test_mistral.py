"""Mistral: Llama with sliding-window attention, exact on the paged cache."""

import pytest
from transformers import MistralConfig
from transformers import MistralForCausalLM as HFMistral

from pagedllm import SamplingParams
from tests.tiny_models import hf_greedy
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


def test_blocks_outside_the_window_are_freed(mistral):
    llm, reference = mistral
    engine = llm.llm_engine
    kv = engine.engine_core.scheduler.kv
    assert kv.sliding_window == SLIDING_WINDOW
    prompt = list(range(5, 5 + 21))
    engine.add_request("long", prompt, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    peak, tokens = 0, []
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens = output.outputs[0].token_ids
        peak = max(peak, kv.pool.num_blocks - kv.num_free_blocks)
    # 81 tokens would hold 21 blocks; with the window only ~window / block_size + 2 stay held.
    assert peak <= SLIDING_WINDOW // BLOCK_SIZE + 3
    assert tokens == hf_greedy(reference, prompt, 60)
    assert kv.num_free_blocks == kv.pool.num_blocks
