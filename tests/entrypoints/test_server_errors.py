"""Errors as OpenAI's JSON with the right status: 400 for anything wrong in a request
(never 422 or 500), 401 without the API key, 404 for an unknown model or route, 413 for
a body past --max-request-bytes; hostile input answered at once, naming the field."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from pagedllm.entrypoints.openai.limits import DEFAULT_MAX_REQUEST_BYTES
from tests.entrypoints.conftest import API_KEY, MODEL

COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}


def check_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in response.text and 'File "' not in response.text
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {**COMPLETION, "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"model": MODEL}, "prompt"),
    ("/v1/completions", {**COMPLETION, "n": 0}, "n"),
    ("/v1/completions", {**COMPLETION, "temperature": -1}, "temperature"),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, "top_p"),
    ("/v1/completions", {**COMPLETION, "logprobs": 21}, "logprobs"),
    ("/v1/completions", {**COMPLETION, "seed": 2**70}, "seed"),
    ("/v1/completions", {**COMPLETION, "stop": [""]}, "stop"),
    ("/v1/completions", {**COMPLETION, "prompt": []}, None),
    ("/v1/completions", {**COMPLETION, "prompt": ""}, None),
    ("/v1/completions", {**COMPLETION, "prompt": [10**6]}, None),
    ("/v1/completions", {**COMPLETION, "prompt": [1, "a"]}, None),
    ("/v1/completions", {**COMPLETION, "stop_token_ids": [10**6], "min_tokens": 1}, "stop_token_ids"),
    ("/v1/completions", {**COMPLETION, "stream_options": {"include_usage": "maybe"}}, None),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"content": "no role"}]}, None),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 30}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, "max_tokens"),
    ("/tokenize", {"prompt": "a", "messages": CHAT["messages"]}, None),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
])
def test_invalid_fields_are_400(http, path, body, param):
    check_error(http.post(path, json=body), 400, param)


@pytest.mark.parametrize("path, body, field", [
    ("/v1/completions", {**COMPLETION, "max_tokens": 10**9}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": -5}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "n": 10**6}, "n"),
    ("/v1/completions", {**COMPLETION, "n": -1}, "n"),
    ("/v1/completions", {**COMPLETION, "logprobs": 10**4}, "logprobs"),
    ("/v1/completions", {**COMPLETION, "logprobs": -1}, "logprobs"),
    ("/v1/completions", {**COMPLETION, "prompt": [5, -1]}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [[5], [2**70]]}, "prompt"),
    ("/v1/completions", {**COMPLETION, "presence_penalty": -3}, "presence_penalty"),
    ("/v1/completions", {**COMPLETION, "stop_token_ids": [-1]}, "stop_token_ids"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 10**9}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "n": 10**6}, "n"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 10**4}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "root", "content": "Hi"}]}, "role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": 7, "content": "Hi"}]}, "role"),
    ("/v1/chat/completions", {**CHAT, "messages": "Hi"}, "messages"),
])
def test_hostile_values_are_400_naming_the_field(http, path, body, field):
    error = check_error(http.post(path, json=body), 400)
    assert field in error["message"], error


@pytest.mark.parametrize("path, content, field", [
    ("/v1/completions", b'{"prompt": "Hi", "max_tokens": 2, "temperature": NaN}', "temperature"),
    ("/v1/completions", b'{"prompt": "Hi", "max_tokens": 2, "top_p": Infinity}', "top_p"),
    ("/v1/completions", b'{"prompt": "Hi", "max_tokens": 2, "frequency_penalty": -Infinity}', "frequency_penalty"),
    ("/v1/completions", b'{"prompt": "Hi", "max_tokens": NaN}', "max_tokens"),
    ("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"prompt": ["ok", "\\udfff"], "max_tokens": 2}', "prompt.1"),
    ("/v1/completions", b'{"prompt": "Hi", "stop": ["\\ud83d"], "max_tokens": 2}', "stop"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
    ("/tokenize", b'{"prompt": "\\udc00"}', "prompt"),
    ("/v1/completions", b'{"prompt": "a\xffb", "max_tokens": 2}', "UTF-8"),
    ("/v1/completions", b'{"prompt": "a\xed\xa0\x80b", "max_tokens": 2}', "UTF-8"),  # a surrogate, UTF-8-coded
])
def test_nan_and_invalid_unicode_are_400_naming_the_field(http, path, content, field):
    error = check_error(http.post(path, content=content, headers={"Content-Type": "application/json"}), 400)
    assert field in error["message"], error


def test_a_one_megabyte_prompt_is_400_at_once(http):
    started = time.monotonic()
    for path, body in (("/v1/completions", {**COMPLETION, "prompt": "a" * 2**20}),
                       ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "é" * 2**19}]})):
        error = check_error(http.post(path, json=body), 400)
        assert "maximum context length is 512 tokens" in error["message"]
    assert time.monotonic() - started < 30
    assert http.get("/health").status_code == 200


def test_a_body_past_the_limit_is_413_before_it_is_read(http):
    """Declared by Content-Length, or only found out while reading a chunked body."""
    body = b'{"prompt": "' + b"a" * DEFAULT_MAX_REQUEST_BYTES + b'"}'
    chunks = (body[i:i + 2**16] for i in range(0, len(body), 2**16))
    for content in (body, chunks):
        response = http.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
        error = check_error(response, 413)
        assert error["code"] == "request_too_large" and "--max-request-bytes" in error["message"]
    assert http.get("/health").status_code == 200


def test_malformed_bodies_are_400(http):
    headers = {"Content-Type": "application/json"}
    for content in (b"{not json", b"[1, 2]", b"", b"\xff\xfe", b'"text"'):
        check_error(http.post("/v1/completions", content=content, headers=headers), 400)
    check_error(http.post("/v1/chat/completions", content=b"plain text", headers={"Content-Type": "text/plain"}),
                400)


def test_over_long_request_is_400_in_vllm_words(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=1000)
    assert "This model's maximum context length is 512 tokens. However, you requested" in str(raised.value)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512 tokens"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 600}])


def test_unknown_model_and_route_are_404(http, client):
    error = check_error(http.post("/v1/completions", json={**COMPLETION, "model": "gpt-9"}), 404, "model")
    assert error["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=CHAT["messages"])
    check_error(http.get("/v1/nothing-here"), 404)
    check_error(http.get("/v1/completions"), 405)


def test_api_key_is_required_on_v1_only(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        error = check_error(httpx.post(f"{server.url}/v1/completions", json=COMPLETION, headers=headers), 401)
        assert error["code"] == "invalid_api_key"
    check_error(httpx.get(f"{server.url}/v1/models"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    for path in ("/health", "/metrics", "/version"):
        assert httpx.get(f"{server.url}{path}").status_code == 200


ODD_VALUES = [None, "x", -1, 10**30, 0.5, True, [], {}, [None], [10**6], {"a": 1}]


def test_odd_values_in_any_field_never_give_a_server_error(http):
    """Each field of each endpoint set to each odd value: answered, never 5xx."""
    bodies = [(path, body) for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT))]
    fields = ["prompt", "messages", "max_tokens", "n", "temperature", "top_p", "stop", "seed", "logprobs", "echo",
              "top_k", "min_p", "repetition_penalty", "min_tokens", "stop_token_ids", "stream", "top_logprobs",
              "max_completion_tokens", "add_generation_prompt", "skip_special_tokens", "presence_penalty"]
    for path, base in bodies:
        for field in fields:
            for value in ODD_VALUES:
                response = http.post(path, json={**base, field: value})
                assert response.status_code in (200, 400), (path, field, value, response.text)
                if response.status_code == 400:
                    check_error(response, 400)
    assert http.get("/health").status_code == 200
