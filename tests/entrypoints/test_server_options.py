"""Server flags on a second tiny server: --max-waiting-requests (503 + Retry-After),
--chat-template from a file, no API key; SIGTERM shuts it down cleanly."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest
from transformers import AutoTokenizer

from tests.entrypoints.conftest import metric_value, start_server
from tests.entrypoints.test_server_errors import check_error

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}|{% endfor %}"
LONG_REQUEST = {"prompt": "Long", "max_tokens": 480, "ignore_eos": True}


@pytest.fixture(scope="module")
def small_server(tmp_path_factory, tiny_model_dir):
    """One running request at most, one waiting."""
    template_file = tmp_path_factory.mktemp("template") / "chat.jinja"
    template_file.write_text(TEMPLATE)
    process = start_server(tmp_path_factory, [tiny_model_dir, "--dtype", "float32", "--num-kv-blocks", "64",
                                              "--max-num-seqs", "1", "--max-waiting-requests", "1",
                                              "--chat-template", str(template_file)], "small-server")
    yield process
    assert process.stop(signal.SIGTERM) == 0
    assert "Application shutdown complete" in process.log


async def _wait_for_metric(client: httpx.AsyncClient, name: str, value: float) -> None:
    deadline = time.monotonic() + 30
    while metric_value((await client.get("/metrics")).text, name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        await asyncio.sleep(0.05)


async def _overload(url: str) -> tuple[httpx.Response, httpx.Response]:
    """-> (the answer to a third request while one runs and one waits, /health meanwhile)."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async with client.stream("POST", "/v1/completions", json={**LONG_REQUEST, "stream": True}) as running:
            lines = running.aiter_lines()  # kept: dropping it would close the stream
            await anext(lines)  # it runs: max_num_seqs is 1
            waiting = asyncio.create_task(client.post("/v1/completions", json=LONG_REQUEST))
            await _wait_for_metric(client, "pagedllm:num_requests_waiting", 1)
            refused = await client.post("/v1/completions", json=LONG_REQUEST)
            health = await client.get("/health")
        waiting.cancel()
        await _wait_for_metric(client, "pagedllm:kv_cache_usage_perc", 0)
    return refused, health


def test_full_waiting_queue_is_503_with_retry_after(small_server):
    refused, health = asyncio.run(_overload(small_server.url))
    error = check_error(refused, 503)
    assert error["type"] == "server_error" and int(refused.headers["Retry-After"]) >= 1
    assert health.status_code == 200  # overloaded, not dead


def test_chat_template_flag_replaces_the_tokenizers(small_server, tiny_model_dir):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    expected = AutoTokenizer.from_pretrained(tiny_model_dir)("[user] Hi|[assistant] Yo|",
                                                              add_special_tokens=False).input_ids
    response = httpx.post(f"{small_server.url}/tokenize", json={"messages": messages})
    assert response.json()["tokens"] == expected
    # No --api-key: /v1 is open.
    chat = httpx.post(f"{small_server.url}/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == len(expected)
