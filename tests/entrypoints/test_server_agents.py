"""The API that agent frameworks use, through the official `openai` client against a real
`pagedllm serve` of the embedded model: structured outputs, tool calls (required, named,
auto with the Hermes parser, streamed, a round trip), reasoning, logit_bias and the other
token controls, cached_tokens, and a 400 naming every field the server cannot honour."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from pagedllm.config import DEFAULT_MODEL_ALIAS as MODEL
from tests.entrypoints.conftest import start_server

QUESTION = [{"role": "user", "content": "What is the weather like in Paris today? Answer in JSON."}]
# Finite: bounded strings and numbers, no extra properties.
WEATHER_SCHEMA = {"type": "object",
                  "properties": {"city": {"type": "string", "maxLength": 24},
                                 "temperature": {"type": "integer", "minimum": -60, "maximum": 60},
                                 "sky": {"enum": ["sunny", "cloudy", "rainy"]}},
                  "required": ["city", "temperature", "sky"], "additionalProperties": False}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}


class Weather(BaseModel):
    city: str
    temperature: int


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = start_server(tmp_path_factory, ["--dtype", "float32", "--max-model-len", "1024", "--num-kv-blocks",
                                              "256", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"],
                           "agents-server")
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _chat(client, **fields):
    return client.chat.completions.create(model=MODEL, **{"messages": QUESTION, "max_tokens": 80, **fields})


def _stream_tool_calls(chunks) -> tuple[dict[int, dict], str | None]:
    """Reassemble streamed delta.tool_calls as a client does: index -> id, name, arguments."""
    calls: dict[int, dict] = {}
    finish_reason = None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish_reason = choice.finish_reason or finish_reason
        for piece in choice.delta.tool_calls or []:
            call = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = piece.id or call["id"]
            if piece.function is not None:
                call["name"] = piece.function.name or call["name"]
                call["arguments"] += piece.function.arguments or ""
    return calls, finish_reason


# ---- structured outputs ---------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_answers_validate_streamed_and_not(client, temperature):
    response_format = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER_SCHEMA,
                                                              "strict": True}}
    full = _chat(client, response_format=response_format, temperature=temperature, seed=5, n=2)
    for choice in full.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), WEATHER_SCHEMA)
    chunks = list(_chat(client, response_format=response_format, temperature=temperature, seed=5, n=2,
                        stream=True))
    for index, choice in enumerate(full.choices):
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks
                           if c.choices and c.choices[0].index == index)
        assert streamed == choice.message.content  # same seed: the stream is the same answer


def test_parse_with_a_pydantic_model(client):
    completion = client.chat.completions.parse(model=MODEL, messages=QUESTION, response_format=Weather,
                                               temperature=0, max_tokens=80)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Weather) and parsed.city


def test_json_object_choice_and_regex(client):
    answer = _chat(client, response_format={"type": "json_object"}, temperature=0, max_tokens=200,
                   messages=[{"role": "user", "content": "Reply with a JSON object with your name."}])
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content), dict)
    choice = client.completions.create(model=MODEL, prompt="The capital of Italy is", max_tokens=10, temperature=0,
                                       extra_body={"structured_outputs": {"choice": ["Rome", "Milan", "Turin"]}})
    assert choice.choices[0].text in ("Rome", "Milan", "Turin")
    pattern = r"[0-9]{3}-[0-9]{4}"
    phone = _chat(client, temperature=1.0, seed=1, extra_body={"structured_outputs": {"regex": pattern}})
    assert re.fullmatch(pattern, phone.choices[0].message.content)


def test_invalid_constraints_are_400(client):
    bad = [{"structured_outputs": {"regex": "(unclosed"}}, {"structured_outputs": {"json": {"type": "objec"}}},
           {"structured_outputs": {"grammar": "root ::= missing"}},
           {"structured_outputs": {"regex": "a", "choice": ["b"]}},
           {"structured_outputs": {"structural_tag": "x"}},
           {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
           {"response_format": {"type": "text_grammar"}},
           {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
           {"tool_choice": "required"}]
    for body in bad:
        with pytest.raises(openai.BadRequestError) as error:
            _chat(client, extra_body=body)
        field = next(iter(body))
        assert field in str(error.value), (body, str(error.value))


# ---- tool calls -------------------------------------------------------------------------------


def test_required_tool_calls_are_valid_calls(client):
    response = _chat(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=0)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def test_named_tool_call_streamed_equals_non_streamed(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    full = _chat(client, tools=TOOLS, tool_choice=named, temperature=0)
    [call] = full.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and full.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS["get_weather"])
    calls, finish_reason = _stream_tool_calls(_chat(client, tools=TOOLS, tool_choice=named, temperature=0,
                                                    stream=True))
    assert finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [("get_weather", call.function.arguments)]
    assert calls[0]["id"].startswith("call_")


def test_required_tool_calls_stream(client):
    calls, finish_reason = _stream_tool_calls(_chat(client, tools=TOOLS, tool_choice="required", temperature=0,
                                                    parallel_tool_calls=False, stream=True))
    assert finish_reason == "tool_calls" and list(calls) == [0]
    jsonschema.validate(json.loads(calls[0]["arguments"]), PARAMETERS[calls[0]["name"]])


def test_auto_tool_calls_are_parsed_from_the_models_format(client):
    # The Hermes format, forced with a regex so that the small model writes it.
    hermes = (r'<tool_call>\n\{"name": "get_weather", "arguments": '
              r'\{"city": "(Paris|Rome)", "unit": "celsius"\}\}\n</tool_call>')
    fields = dict(tools=TOOLS, temperature=0, extra_body={"structured_outputs": {"regex": hermes}})
    full = _chat(client, **fields)
    choice = full.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["unit"] == "celsius"
    calls, finish_reason = _stream_tool_calls(_chat(client, stream=True, **fields))
    assert finish_reason == "tool_calls"
    assert json.loads(calls[0]["arguments"]) == json.loads(call.function.arguments)


def test_tool_round_trip_goes_back_through_the_template(client, server):
    first = _chat(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                  temperature=0)
    call = first.choices[0].message.tool_calls[0]
    conversation = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
    ]
    answer = _chat(client, messages=conversation, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=20)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.choices[0].message.content
    tokens = httpx.post(f"{server.url}/tokenize", json={"messages": conversation}).json()["tokens"]
    rendered = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert "18 degrees and sunny" in rendered


# ---- reasoning ----------------------------------------------------------------------------


def test_reasoning_goes_to_reasoning_content(client):
    thinking = r"<think>\n[a-z ]{1,30}\n</think>\n\n(Yes|No)\."
    fields = dict(messages=[{"role": "user", "content": "Is Paris in France?"}], temperature=0,
                  extra_body={"structured_outputs": {"regex": thinking}})
    message = _chat(client, **fields).choices[0].message
    assert message.content in ("Yes.", "No.")
    assert message.model_extra["reasoning_content"].strip()
    chunks = [c for c in _chat(client, stream=True, **fields) if c.choices]
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert (reasoning, content) == (message.model_extra["reasoning_content"], message.content)
    hidden = _chat(client, **{**fields, "extra_body": {**fields["extra_body"], "include_reasoning": False}})
    assert hidden.choices[0].message.model_extra.get("reasoning_content") is None


def test_chat_template_kwargs_reach_the_template(client):
    assert _chat(client, max_tokens=4, extra_body={"chat_template_kwargs": {"enable_thinking": False}}).choices
    with pytest.raises(openai.BadRequestError, match="chat_template_kwargs"):
        _chat(client, extra_body={"chat_template_kwargs": {"tools": []}})


# ---- token controls and usage -------------------------------------------------------------


def test_logit_bias_bans_and_forces_tokens(client, server):
    prompt = "The capital of France is"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=0)
    first = httpx.post(f"{server.url}/tokenize", json={"prompt": plain.choices[0].logprobs.tokens[0],
                                                      "add_special_tokens": False}).json()["tokens"][0]
    banned = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=0,
                                       logit_bias={str(first): -100})
    assert banned.choices[0].logprobs.tokens[0] != plain.choices[0].logprobs.tokens[0]
    forced_token = httpx.post(f"{server.url}/detokenize", json={"tokens": [3575]}).json()["prompt"]
    forced = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=0,
                                       logit_bias={"3575": 100})
    assert forced.choices[0].logprobs.tokens == [forced_token] * 3


def test_allowed_token_ids_and_bad_words(client, server):
    allowed = [260, 314, 3575]
    text = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=1.0, seed=0,
                                     extra_body={"allowed_token_ids": allowed}).choices[0].text
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert text and set(ids) <= set(allowed)
    plain = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                      temperature=0).choices[0].text
    assert "Paris" in plain
    without = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                        temperature=0, extra_body={"bad_words": ["Paris"]}).choices[0].text
    assert "Paris" not in without


def test_cached_tokens_and_cache_salt(client):
    prompt = "Once upon a time, " * 12  # several full blocks
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body={"cache_salt": "a"})
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body={"cache_salt": "a"})
    other = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body={"cache_salt": "b"})
    assert again.usage.prompt_tokens_details.cached_tokens >= 16
    assert again.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens_details.cached_tokens
    assert other.usage.prompt_tokens_details.cached_tokens == 0


def test_prompt_logprobs_and_truncation(client):
    response = client.completions.create(model=MODEL, prompt="one two three four", max_tokens=1,
                                         extra_body={"prompt_logprobs": 1})
    positions = response.choices[0].model_extra["prompt_logprobs"]
    assert len(positions) == response.usage.prompt_tokens and positions[0] is None
    assert all(1 <= len(position) <= 2 for position in positions[1:])
    truncated = client.completions.create(model=MODEL, prompt="one two three four five six", max_tokens=1,
                                          extra_body={"truncate_prompt_tokens": 3})
    assert truncated.usage.prompt_tokens == 3


# ---- nothing dropped silently ---------------------------------------------------------------


@pytest.mark.parametrize("route, fields, name", [
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"suffix": "the end"}, "suffix"),
    ("completions", {"use_beam_search": True}, "use_beam_search"),
    ("completions", {"priority": 1}, "priority"),
    ("completions", {"stream": True, "prompt_logprobs": 1}, "prompt_logprobs"),
    ("chat", {"functions": [{"name": "f"}]}, "functions"),
    ("chat", {"audio": {"voice": "alloy"}}, "audio"),
    ("chat", {"modalities": ["text", "audio"]}, "modalities"),
    ("chat", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("chat", {"reasoning_effort": "high"}, "reasoning_effort"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "content"),
    ("chat", {"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS}, "tool_choice"),
])
def test_fields_that_cannot_be_honoured_are_400_naming_them(server, route, fields, name):
    body = {"model": MODEL, "max_tokens": 4, **({"prompt": "hi"} if route == "completions" else
                                                {"messages": QUESTION}), **fields}
    path = "/v1/completions" if route == "completions" else "/v1/chat/completions"
    response = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert name in response.json()["error"]["message"]


def test_unknown_fields_are_accepted_and_logged_once(server):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "store": False, "some_future_field": 1}
    for _ in range(2):
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200
    assert server.log.count("'some_future_field'") == 1
