"""AsyncLLMEngine in-process: deltas per request, abort on early close, the model
step off the event loop, and a failing step turning the server to 503."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import aclosing

import httpx
import pytest

from pagedllm.engine.async_engine import AsyncLLMEngine, EngineDeadError, EngineRequest
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.entrypoints.openai.limits import ServerLimits
from pagedllm.entrypoints.openai.server import build_app
from pagedllm.entrypoints.openai.serving import OpenAIServing
from pagedllm.metrics import EngineMetrics
from pagedllm.sampling_params import SamplingParams

PROMPT_IDS = [10, 20, 30, 40, 50]


@pytest.fixture
def engine(tiny_model_dir) -> LLMEngine:
    return LLMEngine.from_args(model=tiny_model_dir, dtype="float32", num_kv_blocks=64)


def request(request_id: str, max_tokens: int) -> EngineRequest:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return EngineRequest(request_id, None, PROMPT_IDS, params, time.monotonic())


async def _wait_idle(async_engine: AsyncLLMEngine) -> None:
    deadline = time.monotonic() + 30
    while async_engine.stats.kv_cache_usage > 0 or async_engine.stats.num_running:
        assert time.monotonic() < deadline, "blocks were not freed"
        await asyncio.sleep(0.01)


def test_deltas_add_up_and_closing_early_aborts(engine, monkeypatch):
    finish_reasons = {}

    def observe(stats, outputs, turn_started):
        finish_reasons.update((o.request_id, o.outputs[0].finish_reason) for o in outputs if o.finished)

    caller_left = threading.Event()
    real_step = engine.step
    num_gated_steps = []

    def one_step_then_wait_for_the_caller():
        # "c" gets its first token, then the engine waits for its caller to leave: however fast the machine,
        # it cannot finish first (the wait is bounded so that a failing test still ends).
        if num_gated_steps:
            caller_left.wait(timeout=30)
        num_gated_steps.append(1)
        return real_step()

    async def scenario():
        async_engine = AsyncLLMEngine(engine, observe)
        async_engine.start()
        try:
            deltas = [d async for d in async_engine.generate([request("a", 6), request("b", 4)])]
            per_request = {rid: sum(len(d.outputs[0].token_ids) for d in deltas if d.request_id == rid and d.outputs)
                           for rid in "ab"}
            assert per_request == {"a": 6, "b": 4}
            monkeypatch.setattr(engine, "step", one_step_then_wait_for_the_caller)
            async with aclosing(async_engine.generate([request("c", 400)])) as stream:
                await anext(stream)
                assert async_engine.stats.kv_cache_usage > 0
            caller_left.set()
            await _wait_idle(async_engine)
            assert not engine.has_unfinished_requests()
            assert finish_reasons == {"a": "length", "b": "length", "c": "abort"}
        finally:
            caller_left.set()
            await async_engine.shutdown()

    asyncio.run(scenario())


def test_the_model_step_does_not_block_the_event_loop(engine, monkeypatch):
    real_step = engine.step
    loop_ran = threading.Event()
    steps_that_saw_the_loop_run = []

    def slow_step():
        # A long model step: it lasts until the event loop has run meanwhile, which a loop blocked by the step
        # never does (the step then gives up after 10 s, and the test fails).
        loop_ran.clear()
        steps_that_saw_the_loop_run.append(loop_ran.wait(timeout=10))
        return real_step()

    monkeypatch.setattr(engine, "step", slow_step)

    async def scenario():
        async_engine = AsyncLLMEngine(engine)
        async_engine.start()

        async def ticker():
            while True:
                await asyncio.sleep(0.005)
                loop_ran.set()

        ticking = asyncio.create_task(ticker())
        try:
            [d async for d in async_engine.generate([request("a", 3)])]
        finally:
            ticking.cancel()
            await async_engine.shutdown()

    asyncio.run(scenario())
    assert steps_that_saw_the_loop_run and all(steps_that_saw_the_loop_run), steps_that_saw_the_loop_run


def test_a_failing_step_kills_the_engine_and_the_server_answers_503(engine, monkeypatch):
    def broken_step():
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "step", broken_step)
    metrics = EngineMetrics("tiny")
    async_engine = AsyncLLMEngine(engine, metrics.observe)
    app = build_app(OpenAIServing(async_engine, "tiny", None, ServerLimits(max_waiting_requests=8)), metrics)

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
    assert in_flight.status_code == 503 and "boom" not in in_flight.text
    assert in_flight.json()["error"]["type"] == "server_error"
    assert health.status_code == 503 and after.status_code == 503
