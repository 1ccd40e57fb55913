"""Security defaults: listens on 127.0.0.1, limits documented in --help, no trace or
file path in any error body, random response ids, CORS off unless --allowed-origins
(the API key is tested with the other errors, CORS on with the server options)."""

from __future__ import annotations

import asyncio
import re
import types

import httpx
import pytest

from pagedllm.entrypoints.cli import build_parser
from pagedllm.entrypoints.openai.limits import ServerLimits
from pagedllm.entrypoints.openai.server import build_app
from pagedllm.entrypoints.openai.serving import OpenAIServing
from pagedllm.metrics import EngineMetrics
from tests.entrypoints.conftest import MODEL

# What must never reach a client: a trace, a source file, a path on the server.
LEAK = re.compile(r'Traceback|File "|\.py\b|/(?:home|usr|tmp|work|srv|site-packages)/')


def test_defaults_listen_locally_and_limits_are_documented(capsys):
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.allowed_origins is None and args.api_key is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for flag in ("--max-request-bytes", "--max-prompt-tokens", "--max-n", "--max-logprobs", "--max-waiting-requests",
                 "--allowed-origins"):
        assert flag in help_text
    for default in ("default 127.0.0.1", "default 16777216", "default 128", "default 20", "default 1024",
                    "CORS off"):
        assert default in help_text, default


def test_error_bodies_hold_no_trace_or_path(server, http):
    responses = [http.get("/v1/nothing-here"), http.get("/nowhere/x.py"), http.get("/v1/completions"),
                 http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "n": "x"}),
                 http.post("/v1/completions", content=b"{", headers={"Content-Type": "application/json"}),
                 http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": {"a": 1}}]}),
                 httpx.post(f"{server.url}/v1/completions", json={})]
    for response in responses:
        assert 400 <= response.status_code < 500 and "error" in response.json()
        assert not LEAK.search(response.text), response.text


def test_an_unexpected_exception_is_a_bare_500():
    """The handler of last resort: the exception (here naming a file) stays in the log."""
    stub_engine = types.SimpleNamespace(input_processor=None, tokenizer=None)
    serving = OpenAIServing(stub_engine, MODEL, None, ServerLimits())

    def broken():
        raise OSError("/srv/secret/weights.py: disk on fire")

    serving.models = broken
    app = build_app(serving, EngineMetrics(MODEL))

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/v1/models")

    response = asyncio.run(get())
    assert response.status_code == 500 and response.json()["error"]["message"] == "internal server error"
    assert not LEAK.search(response.text) and "secret" not in response.text


def test_response_ids_are_random(http):
    bodies = [{"model": MODEL, "prompt": "Hi", "max_tokens": 1}] * 3
    ids = [http.post("/v1/completions", json=body).json()["id"] for body in bodies]
    ids.append(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                        "max_tokens": 1}).json()["id"])
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"(cmpl|chatcmpl)-[0-9a-f]{32}", request_id) for request_id in ids), ids


def test_cors_is_off_without_allowed_origins(server):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    responses = [httpx.options(f"{server.url}/v1/completions", headers=preflight),
                 httpx.get(f"{server.url}/health", headers={"Origin": "https://app.example"})]
    assert responses[0].status_code >= 400
    assert all("access-control-allow-origin" not in response.headers for response in responses)
