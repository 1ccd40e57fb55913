"""Request models without a server: how request fields become SamplingParams (the model's
generation_config defaults, the one output constraint) and which fields are refused."""

from __future__ import annotations

import pytest

from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from pagedllm.sampling_params import StructuredOutputsParams

MESSAGES = [{"role": "user", "content": "hi"}]
DEFAULTS = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_tokens": 512}


def test_generation_config_defaults_fill_only_unset_fields():
    request = ChatCompletionRequest(messages=MESSAGES, temperature=1.0)
    params = request.sampling_params(None, None, defaults=DEFAULTS)
    assert (params.temperature, params.top_p, params.top_k) == (1.0, 0.9, 20)
    # max_tokens depends on the prompt's length: the server applies that default per prompt.
    assert params.max_tokens is None


def test_one_output_constraint_from_any_of_its_fields():
    schema = {"type": "object"}
    request = ChatCompletionRequest(messages=MESSAGES, response_format={"type": "json_schema",
                                                                        "json_schema": {"name": "x", "schema": schema}})
    assert request.structured_outputs_params() == StructuredOutputsParams(json=schema)
    assert ChatCompletionRequest(messages=MESSAGES, response_format={"type": "json_object"}
                                 ).structured_outputs_params() == StructuredOutputsParams(json_object=True)
    text = ChatCompletionRequest(messages=MESSAGES, response_format={"type": "text"})
    assert text.structured_outputs_params() is None
    assert CompletionRequest(prompt="x", guided_regex="a+").structured_outputs_params() == StructuredOutputsParams(
        regex="a+")
    assert CompletionRequest(prompt="x", structured_outputs={"choice": ["a", "b"]}).structured_outputs_params() == (
        StructuredOutputsParams(choice=["a", "b"]))
    with pytest.raises(ValueError, match="guided_regex: give only one output constraint"):
        CompletionRequest(prompt="x", structured_outputs={"choice": ["a"]},
                          guided_regex="a").structured_outputs_params()
    with pytest.raises(ValueError, match="structured_outputs: .*exactly one"):
        CompletionRequest(prompt="x", structured_outputs={"choice": ["a"], "regex": "b"}).structured_outputs_params()


def test_fields_that_change_the_answer_are_refused_by_name_and_neutral_values_pass():
    refused = CompletionRequest(prompt="x", n=2, best_of=3, suffix="s", priority=2, use_beam_search=True)
    assert [name for name, _ in refused.unsupported_fields()] == ["best_of", "use_beam_search", "priority", "suffix"]
    neutral = CompletionRequest(prompt="x", n=2, best_of=2, priority=0, use_beam_search=False, suffix="")
    assert neutral.unsupported_fields() == []
    chat = ChatCompletionRequest(messages=MESSAGES, modalities=["text"], store=True, metadata={"a": "b"})
    assert chat.unsupported_fields() == [] and set(chat.model_extra) == {"store", "metadata"}
