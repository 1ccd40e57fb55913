"""Server flags on a second tiny server: --max-waiting-requests (503 + Retry-After, also
for a burst far beyond it), --chat-template from a file, --allowed-origins (CORS),
--kv-cache-dtype, no API key; SIGTERM shuts it down cleanly."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time

import httpx
import pytest
from transformers import AutoTokenizer

from tests.entrypoints.conftest import metric_value, start_server
from tests.entrypoints.test_server_errors import check_error

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}|{% endfor %}"
LONG_REQUEST = {"prompt": "Long", "max_tokens": 480, "ignore_eos": True}
ORIGIN = "https://app.example"
BURST_SIZE = 40
BURST_PROMPTS = ["Burst one", "Burst two", "Burst three"]
# Generous bounds for a busy 2-core machine: a refusal is immediate, an admitted request
# waits for at most a few others of about a second each.
REFUSAL_LATENCY_S = 5
ADMITTED_LATENCY_S = 90


@pytest.fixture(scope="module")
def small_server(tmp_path_factory, tiny_model_dir):
    """One running request at most, one waiting."""
    template_file = tmp_path_factory.mktemp("template") / "chat.jinja"
    template_file.write_text(TEMPLATE)
    process = start_server(tmp_path_factory, [tiny_model_dir, "--dtype", "float32", "--num-kv-blocks", "64",
                                              "--max-num-seqs", "1", "--max-waiting-requests", "1",
                                              "--chat-template", str(template_file), "--allowed-origins", ORIGIN,
                                              "--kv-cache-dtype", "float16"],
                           "small-server")
    yield process
    assert process.stop(signal.SIGTERM) == 0
    assert "Application shutdown complete" in process.log


def test_kv_cache_dtype_flag_reaches_the_pool(small_server):
    # 64 blocks of float16 K/V under float32 weights: the engine's start-up line
    assert re.search(r"KV cache: 64 blocks .* GiB \(float16\)", small_server.log)


async def _wait_for_metric(client: httpx.AsyncClient, name: str, value: float) -> None:
    deadline = time.monotonic() + 30
    while metric_value((await client.get("/metrics")).text, name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        await asyncio.sleep(0.05)


async def _overload(url: str) -> tuple[httpx.Response, httpx.Response]:
    """-> (the answer to another request while one runs and one waits, /health meanwhile)."""
    # Two prompts in one stream: from its first token on (max_num_seqs is 1) one runs and one waits until
    # the first has made its 480 tokens, far longer than the next request takes to arrive on any machine.
    two_prompts = {**LONG_REQUEST, "prompt": [LONG_REQUEST["prompt"], "Longer"], "stream": True}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async with client.stream("POST", "/v1/completions", json=two_prompts) as running:
            lines = running.aiter_lines()  # kept: dropping it would close the stream
            await anext(lines)
            await _wait_for_metric(client, "pagedllm:num_requests_waiting", 1)
            refused = await client.post("/v1/completions", json=LONG_REQUEST)
            health = await client.get("/health")
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


def _burst_request(i: int) -> dict:
    return {"prompt": BURST_PROMPTS[i % len(BURST_PROMPTS)], "max_tokens": 160, "ignore_eos": True,
            "temperature": 0, "stream": i % 2 == 1}


async def _send(client: httpx.AsyncClient, body: dict) -> tuple[int, dict[str, str], str, float]:
    """-> (status, headers, the completion text or error body, seconds taken)."""
    started = time.monotonic()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        raw = (await response.aread()).decode()
    if response.status_code == 200 and body["stream"]:
        events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
        assert all("error" not in event for event in events), raw
        text = "".join(choice["text"] for event in events for choice in event["choices"])
    elif response.status_code == 200:
        text = json.loads(raw)["choices"][0]["text"]
    else:
        text = raw
    return response.status_code, dict(response.headers), text, time.monotonic() - started


async def _burst(url: str) -> tuple[dict[str, str], list[tuple[int, dict[str, str], str, float]]]:
    limits = httpx.Limits(max_connections=BURST_SIZE)
    async with httpx.AsyncClient(base_url=url, timeout=ADMITTED_LATENCY_S, limits=limits) as client:
        expected = {}
        for prompt in BURST_PROMPTS:  # one at a time: the reference outputs
            expected[prompt] = (await _send(client, {**_burst_request(0), "prompt": prompt}))[2]
        results = await asyncio.gather(*(_send(client, _burst_request(i)) for i in range(BURST_SIZE)))
        await _wait_for_metric(client, "pagedllm:kv_cache_usage_perc", 0)
    return expected, results


def test_a_burst_far_beyond_the_waiting_limit_is_refused_at_once_and_the_rest_served(small_server):
    expected, results = asyncio.run(_burst(small_server.url))
    admitted = [(i, result) for i, result in enumerate(results) if result[0] == 200]
    refused = [result for result in results if result[0] != 200]
    assert admitted and len(refused) >= BURST_SIZE // 2, [result[0] for result in results]
    for status, headers, body, seconds in refused:
        assert status == 503 and int(headers["retry-after"]) >= 1, body
        assert json.loads(body)["error"]["code"] == "overloaded"
        assert seconds < REFUSAL_LATENCY_S
    for i, (_, _, text, seconds) in admitted:
        assert text == expected[_burst_request(i)["prompt"]] and seconds < ADMITTED_LATENCY_S
    print(f"burst of {BURST_SIZE}: {len(admitted)} admitted (slowest {max(r[3] for _, r in admitted):.1f} s), "
          f"{len(refused)} refused (slowest {max(r[3] for r in refused):.2f} s)")


def test_cors_allows_only_the_given_origins(small_server):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    allowed = httpx.options(f"{small_server.url}/v1/completions", headers={"Origin": ORIGIN, **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    denied = httpx.options(f"{small_server.url}/v1/completions",
                           headers={"Origin": "https://evil.example", **preflight})
    assert denied.status_code == 400 and "access-control-allow-origin" not in denied.headers
    models = httpx.get(f"{small_server.url}/v1/models", headers={"Origin": ORIGIN})
    assert models.status_code == 200 and models.headers["access-control-allow-origin"] == ORIGIN
