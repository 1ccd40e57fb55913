"""Greedy outputs with tensor parallelism (2 worker processes, gloo) equal those of
one process: on tiny checkpoints whose shapes stress the sharding, and on the
embedded SmolLM2 (9 query / 3 KV heads: ranks hold 1 and 2 KV groups)."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from tests.distributed.conftest import ENGINE_ARGS, TINY_MODELS, assert_same_outputs, greedy_outputs, shutdown

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("model", list(TINY_MODELS))
def test_tp2_equals_tp1_on_tiny_checkpoints(tiny_checkpoints, model):
    reference = greedy_outputs(LLM(tiny_checkpoints[model], **ENGINE_ARGS))
    llm = LLM(tiny_checkpoints[model], tensor_parallel_size=2, **ENGINE_ARGS)
    try:
        assert_same_outputs(greedy_outputs(llm), reference)
    finally:
        shutdown(llm)


def test_tp2_equals_tp1_on_the_embedded_model():
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    args = dict(dtype="float32", max_model_len=512, num_kv_blocks=96)

    def texts(llm: LLM) -> list[tuple[list[int], str]]:
        return [(o.outputs[0].token_ids, o.outputs[0].text) for o in llm.generate(prompts, params, use_tqdm=False)]

    reference = texts(LLM(**args))
    llm = LLM(tensor_parallel_size=2, **args)
    try:
        assert texts(llm) == reference
    finally:
        shutdown(llm)
