"""Qwen2 (Q/K/V bias, tied embeddings as on the small sizes) and Qwen3
(per-head q/k RMSNorm, head_dim != hidden / heads, sliding window on the
layers from max_window_layers on) against transformers."""

from types import SimpleNamespace

import pytest
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from pagedllm.models.qwen2 import _qwen_sliding_window
from tests.models.helpers import assert_matches_reference, engine_and_reference, make_prompts, tiny_kwargs

CASES = {
    "qwen2": lambda: (Qwen2ForCausalLM, Qwen2Config(**tiny_kwargs(tie_word_embeddings=True))),
    "qwen3": lambda: (Qwen3ForCausalLM, Qwen3Config(**tiny_kwargs(head_dim=32, use_sliding_window=True,
                                                                  sliding_window=10, max_window_layers=1))),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def qwen(request, tmp_path_factory):
    return engine_and_reference(tmp_path_factory, request.param, *CASES[request.param]())


def test_batch_of_one(qwen):
    llm, reference = qwen
    assert_matches_reference(llm, reference, make_prompts()[1:2])


def test_mixed_batch(qwen):
    llm, reference = qwen
    assert_matches_reference(llm, reference, make_prompts(seed=1))


@pytest.mark.parametrize("keys, windows", [
    # transformers 4.x Qwen2.5 config: a window size is given but switched off
    (dict(use_sliding_window=False, sliding_window=131072, max_window_layers=21), [None, None, None]),
    (dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), [None, 8, 8]),
    (dict(use_sliding_window=True, sliding_window=8, max_window_layers=1,
          layer_types=["sliding_attention", "full_attention", "sliding_attention"]), [8, None, 8]),
    # a window covering the whole context masks nothing
    (dict(use_sliding_window=True, sliding_window=4096, max_window_layers=0), [None, None, None]),
])
def test_sliding_window_of_each_layer(keys, windows):
    config = SimpleNamespace(max_position_embeddings=4096, **keys)
    assert [_qwen_sliding_window(config, i) for i in range(3)] == windows
