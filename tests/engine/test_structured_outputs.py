"""Structured outputs offline (SamplingParams(structured_outputs=...)) on a tiny random
model: whatever the weights say, the output follows the grammar — greedy and sampled,
n > 1, in any batch, through preemption — and invalid specs are ValueErrors."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.sampling_params import StructuredOutputsParams
from tests.tiny_models import save_tiny_llama

MAX_MODEL_LEN = 256
# Finite: every string is bounded and no extra properties, so enough tokens always finish it.
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "maximum": 999},
                         "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3}},
          "required": ["name", "age", "pets"], "additionalProperties": False}
REGEX = r"[0-9]{3}-[a-z]{2,4}"
PROMPTS = ["hello", "a person:", {"prompt_token_ids": [5, 6, 7, 8]}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny-llama"))
    save_tiny_llama(folder, MAX_MODEL_LEN)
    return LLM(folder, dtype="float32", num_kv_blocks=128, block_size=4)


def _params(spec: StructuredOutputsParams, **fields) -> SamplingParams:
    return SamplingParams(structured_outputs=spec, **{"temperature": 0, "max_tokens": 200, **fields})


def _free(llm: LLM) -> bool:
    kv = llm.llm_engine.engine_core.scheduler.kv
    return kv.num_free_blocks == kv.pool.num_blocks


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_always_validate(llm, temperature):
    params = _params(StructuredOutputsParams(json=SCHEMA), temperature=temperature, seed=7, n=3)
    for output in llm.generate(PROMPTS, params, use_tqdm=False):
        for sample in output.outputs:
            assert sample.finish_reason == "stop", sample.text
            jsonschema.validate(json.loads(sample.text), SCHEMA)
    assert _free(llm)


def test_regex_choice_grammar_and_json_object(llm):
    specs = [(StructuredOutputsParams(regex=REGEX), lambda text: re.fullmatch(REGEX, text)),
             (StructuredOutputsParams(choice=["yes", "no", "maybe not"]), lambda text: text in ("yes", "no",
                                                                                             "maybe not")),
             (StructuredOutputsParams(grammar='root ::= "(" [ab]{1,3} ")"'), lambda text: re.fullmatch(r"\([ab]{1,3}\)",
                                                                                                     text)),
             (StructuredOutputsParams(grammar='start: "x" DIGIT DIGIT\nDIGIT: /[0-9]/'),
              lambda text: re.fullmatch(r"x[0-9]{2}", text))]
    for spec, check in specs:
        for output in llm.generate(PROMPTS, _params(spec, temperature=1.0, seed=3), use_tqdm=False):
            sample = output.outputs[0]
            assert sample.finish_reason == "stop" and check(sample.text), (spec, sample.text)
    # Any JSON object: unbounded, so only what was generated is checked to be a JSON prefix's start.
    [output] = llm.generate(["x"], _params(StructuredOutputsParams(json_object=True), max_tokens=40),
                            use_tqdm=False)
    assert output.outputs[0].text.startswith("{")


def test_constrained_greedy_output_does_not_depend_on_the_batch(llm):
    constrained = _params(StructuredOutputsParams(json=SCHEMA))
    [alone] = llm.generate(["a person:"], constrained, use_tqdm=False)
    free = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    mixed = llm.generate(["a person:", "hello", "zzz"], [constrained, free, constrained], use_tqdm=False)
    assert mixed[0].outputs[0].text == alone.outputs[0].text
    assert mixed[1].outputs[0].finish_reason == "length"  # the unconstrained row is not masked


def test_preemption_keeps_the_grammar_state(tmp_path):
    folder = str(tmp_path)
    save_tiny_llama(folder, MAX_MODEL_LEN)
    roomy = LLM(folder, dtype="float32", num_kv_blocks=256, block_size=4, max_model_len=128)
    params = _params(StructuredOutputsParams(json=SCHEMA), max_tokens=100, n=2, temperature=1.0, seed=11)
    prompts = [f"prompt number {i}:" for i in range(6)]
    expected = [[s.text for s in o.outputs] for o in roomy.generate(prompts, params, use_tqdm=False)]
    tight = LLM(folder, dtype="float32", num_kv_blocks=40, block_size=4, max_model_len=128)
    got = [[s.text for s in o.outputs] for o in tight.generate(prompts, params, use_tqdm=False)]
    assert tight.llm_engine.engine_core.scheduler.num_preemptions_total > 0
    assert got == expected
    for texts in got:
        for text in texts:
            jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("spec, message", [
    (dict(json={"type": "objec"}), "structured_outputs.json"),
    (dict(json="{not json"), "structured_outputs.json"),
    (dict(regex="(unclosed"), "structured_outputs.regex"),
    (dict(grammar="root ::= undefined_rule"), "structured_outputs.grammar"),
    (dict(regex="a" * 70_000), "too long"),
])
def test_invalid_specs_are_value_errors_naming_the_field(llm, spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.generate(["x", "y"], _params(StructuredOutputsParams(**spec)), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()  # nothing was queued


def test_a_spec_sets_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    assert SamplingParams(structured_outputs={"regex": "a+"}).structured_outputs == StructuredOutputsParams(regex="a+")
