"""AsyncLLMEngine with its engine core in another process: deltas per request, abort
on early close, a failing step or a killed core turning the server to 503 at once,
and no engine process outliving a killed server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from contextlib import aclosing

import httpx
import psutil
import pytest

from pagedllm.engine.async_engine import AsyncLLMEngine, EngineDeadError
from pagedllm.engine.core_process import FAULT_INJECT_ENV
from pagedllm.engine.engine_core import EngineCoreRequest
from pagedllm.engine_args import EngineArgs
from pagedllm.entrypoints.openai.limits import ServerLimits
from pagedllm.entrypoints.openai.server import build_app
from pagedllm.entrypoints.openai.serving import OpenAIServing
from pagedllm.metrics import EngineMetrics
from pagedllm.sampling_params import SamplingParams
from tests.entrypoints.conftest import TINY_MAX_MODEL_LEN, free_port

pytestmark = pytest.mark.timeout(240)
PROMPT_IDS = [10, 20, 30, 40, 50]
# As many tokens as the context allows: a request its caller leaves after one delta
# cannot finish first.
LONGEST = TINY_MAX_MODEL_LEN - len(PROMPT_IDS)


def request(request_id: str, max_tokens: int) -> EngineCoreRequest:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return EngineCoreRequest(request_id, PROMPT_IDS, params, time.monotonic())


def engine_config(model_dir: str):
    return EngineArgs(model=model_dir, dtype="float32", num_kv_blocks=64).create_engine_config()


async def _wait_idle(async_engine: AsyncLLMEngine) -> None:
    deadline = time.monotonic() + 60
    while async_engine.stats.kv_cache_usage > 0 or async_engine.stats.num_running:
        assert time.monotonic() < deadline, "blocks were not freed"
        await asyncio.sleep(0.01)


def test_deltas_add_up_and_closing_early_aborts(tiny_model_dir):
    finish_reasons = {}

    def observe(replica, stats, outputs, turn_started):
        finish_reasons.update((o.request_id, o.outputs[0].finish_reason) for o in outputs if o.finished)

    async_engine = AsyncLLMEngine(engine_config(tiny_model_dir), observe)
    core_pid = async_engine.cores[0].process.pid
    assert core_pid != os.getpid()

    async def scenario():
        async_engine.start()
        try:
            deltas = [d async for d in async_engine.generate([request("a", 6), request("b", 4)], ["A", None])]
            per_request = {rid: sum(len(d.outputs[0].token_ids) for d in deltas if d.request_id == rid and d.outputs)
                           for rid in "ab"}
            assert per_request == {"a": 6, "b": 4}
            assert {d.request_id: d.prompt for d in deltas} == {"a": "A", "b": None}
            async with aclosing(async_engine.generate([request("c", LONGEST)])) as stream:
                await anext(stream)
            await _wait_idle(async_engine)
            assert finish_reasons == {"a": "length", "b": "length", "c": "abort"}
            assert async_engine.router.replicas[0].in_flight == 0
        finally:
            await async_engine.shutdown()

    asyncio.run(scenario())
    assert not psutil.pid_exists(core_pid)


@pytest.mark.parametrize("backend", ["mp", "ray"])
def test_a_replicas_start_up_error_is_raised_here_and_nothing_is_left(backend, request, tiny_model_dir):
    """-dp 2 with a pool too small for one request: the core's ValueError is raised as
    in-process, whether the cores are processes or Ray actors, and none is left behind."""
    if backend == "ray":
        request.getfixturevalue("ray_cluster")  # which skips the test without Ray
    config = EngineArgs(model=tiny_model_dir, dtype="float32", num_kv_blocks=8, data_parallel_size=2,
                        distributed_executor_backend=backend).create_engine_config()
    with pytest.raises(ValueError, match="needs 32 blocks"):
        AsyncLLMEngine(config)
    assert not [child for child in psutil.Process().children() if "spawn_main" in " ".join(child.cmdline())]
    if backend == "ray":  # the actors are killed and their placement groups removed: every CPU is free again
        import ray

        deadline = time.monotonic() + 30
        while ray.available_resources().get("CPU") != 2:
            assert time.monotonic() < deadline, ray.available_resources()
            time.sleep(0.05)


def _serve(async_engine: AsyncLLMEngine, metrics: EngineMetrics):
    return build_app(OpenAIServing(async_engine, "tiny", None, ServerLimits(max_waiting_requests=8)), metrics)


def test_a_failing_step_kills_the_engine_and_the_server_answers_503(tiny_model_dir, monkeypatch):
    monkeypatch.setenv(FAULT_INJECT_ENV, "1")  # the core process inherits it
    metrics = EngineMetrics("tiny")
    async_engine = AsyncLLMEngine(engine_config(tiny_model_dir), metrics.observe)
    app = _serve(async_engine, metrics)

    async def scenario():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                assert (await client.get("/health")).status_code == 200
                in_flight = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
                health = await client.get("/health")
                after = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
            with pytest.raises(EngineDeadError):
                await anext(async_engine.generate([request("x", 1)]))
        return in_flight, health, after

    in_flight, health, after = asyncio.run(scenario())
    assert in_flight.status_code == 503 and "fault injected" not in in_flight.text
    assert in_flight.json()["error"]["type"] == "server_error"
    assert "internal error (RuntimeError)" in in_flight.json()["error"]["message"]
    assert health.status_code == 503 and after.status_code == 503


class _Server:
    """`pagedllm serve` on the tiny model, as a user starts it."""

    def __init__(self, model_dir: str, log_path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self._log = open(log_path, "w")
        self.log_path = log_path
        self.process = subprocess.Popen([sys.executable, "-m", "pagedllm", "serve", model_dir, "--dtype", "float32",
                                         "--num-kv-blocks", "64", "--port", self.url.rsplit(":", 1)[1]],
                                        stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while not self.healthy():
            assert self.process.poll() is None and time.monotonic() < deadline, open(log_path).read()
            time.sleep(0.2)
        children = psutil.Process(self.process.pid).children(recursive=True)
        self.core_processes = [p for p in children if "spawn_main" in " ".join(p.cmdline())]
        assert len(self.core_processes) == 1

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


def test_a_killed_engine_core_fails_requests_in_flight_and_health_at_once(tiny_model_dir, tmp_path):
    server = _Server(tiny_model_dir, tmp_path / "server.log")
    try:
        body = {"prompt": "Hi", "max_tokens": LONGEST - 10, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: {")
            server.core_processes[0].send_signal(signal.SIGKILL)
            killed = time.monotonic()
            rest = list(lines)
        while server.healthy():
            time.sleep(0.01)
        unhealthy_after = time.monotonic() - killed
        after = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
    finally:
        server.close()
    errors = [line for line in rest if line.startswith('data: {"error"')]
    assert errors and "engine core 0 exited" in errors[0] and "SIGKILL" in errors[0], rest[-4:]
    assert [line for line in rest if line][-1] == "data: [DONE]"
    assert unhealthy_after < 1.0, unhealthy_after
    assert after.status_code == 503 and after.json()["error"]["code"] == "engine_dead"


def test_a_killed_server_leaves_no_engine_process(tiny_model_dir, tmp_path):
    server = _Server(tiny_model_dir, tmp_path / "server.log")
    try:
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        _, alive = psutil.wait_procs(server.core_processes, timeout=30)
        assert not alive, [p.pid for p in alive]
    finally:
        server.close()
