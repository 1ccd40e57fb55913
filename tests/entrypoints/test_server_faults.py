"""Faults on a real server: a model step that raises (the PAGEDLLM_FAULT_INJECT_STEP
test hook) fails the requests in flight with a 5xx saying what happened and leaves
/health at 503, never a hang; SIGTERM under load ends every request cleanly and the
process exits 0. (Killing a tensor-parallel worker is tested with -tp.)"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest

from pagedllm.engine.core_process import FAULT_INJECT_ENV
from tests.entrypoints.conftest import metric_value, start_server
from tests.entrypoints.test_server_security import LEAK

FAULT_STEP = 12
LONG = {"prompt": "Fault", "max_tokens": 400, "ignore_eos": True}
# No request may hang: each ends within this, fault or not.
REQUEST_TIMEOUT_S = 60


def _server_args(tiny_model_dir: str) -> list[str]:
    # Named: by default the served name is MODEL as given, here a path.
    return [tiny_model_dir, "--dtype", "float32", "--num-kv-blocks", "64", "--max-num-seqs", "4",
            "--served-model-name", "tiny"]


async def _request(client: httpx.AsyncClient, stream: bool) -> tuple[int, str]:
    """-> (status, body); a stream's body is everything it sent, its end included."""
    async with client.stream("POST", "/v1/completions", json={**LONG, "stream": stream}) as response:
        return response.status_code, (await response.aread()).decode()


def _stream_error(body: str) -> dict | None:
    """The error event of an SSE body (None if it has none); the stream ends properly."""
    assert body.endswith("data: [DONE]\n\n"), body[-300:]
    events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
    return next((event["error"] for event in events if "error" in event), None)


def _finish_reason(body: str, streamed: bool) -> str | None:
    """The finish reason of a whole answer, streamed or not."""
    events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
    return (events[-1] if streamed else json.loads(body))["choices"][-1]["finish_reason"]


async def _load_then_fault(url: str) -> tuple[list[tuple[int, str]], httpx.Response, httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        in_flight = await asyncio.wait_for(
            asyncio.gather(*(_request(client, stream) for stream in (True, False, True, False))), REQUEST_TIMEOUT_S)
        return in_flight, await client.get("/health"), await client.post("/v1/completions", json=LONG)


def test_a_failing_model_step_fails_requests_with_5xx_and_health_503(tmp_path_factory, tiny_model_dir):
    server = start_server(tmp_path_factory, _server_args(tiny_model_dir), "fault-server",
                          env={FAULT_INJECT_ENV: str(FAULT_STEP)})
    try:
        in_flight, health, after = asyncio.run(_load_then_fault(server.url))
    finally:
        assert server.stop(signal.SIGTERM) == 0
    for status, body in in_flight:
        error = _stream_error(body) if status == 200 else json.loads(body)["error"]
        assert status == 200 or status >= 500, body
        assert error is not None and error["type"] == "server_error", body
        assert "internal error (RuntimeError)" in error["message"] and not LEAK.search(body), body
    assert health.status_code == 503
    assert after.status_code == 503 and "internal error (RuntimeError)" in after.json()["error"]["message"]
    assert not LEAK.search(after.text)
    assert f"fault injected into model step {FAULT_STEP}" in server.log  # the details are in the log only


async def _load_then_sigterm(server) -> list[tuple[int, str]]:
    async with httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as client:
        requests = [asyncio.create_task(_request(client, i % 2 == 0)) for i in range(8)]
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while metric_value((await client.get("/metrics")).text, "pagedllm:num_requests_running") < 4:
            assert time.monotonic() < deadline, "the load never started"
            await asyncio.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(asyncio.gather(*requests), REQUEST_TIMEOUT_S)


def test_sigterm_under_load_ends_every_request_cleanly_and_exits_0(tmp_path_factory, tiny_model_dir):
    server = start_server(tmp_path_factory, _server_args(tiny_model_dir), "sigterm-server")
    try:
        results = asyncio.run(_load_then_sigterm(server))
        exit_code = server.proc.wait(timeout=REQUEST_TIMEOUT_S)
    finally:
        server.stop(signal.SIGKILL)  # a no-op once it has exited
    num_cut = 0
    for i, (status, body) in enumerate(results):
        streamed = i % 2 == 0 and status == 200
        error = _stream_error(body) if streamed else json.loads(body).get("error")
        if error is None:  # done before the signal came (a fast machine): then it is whole
            assert status == 200 and _finish_reason(body, streamed) == "length", body[-300:]
            continue
        assert status in (200, 503) and "shutting down" in error["message"], body
        num_cut += 1
    # Four were running when the signal was sent, and the others could start only after them: some were cut.
    assert num_cut > 0
    assert exit_code == 0
    assert "Application shutdown complete" in server.log
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health")
