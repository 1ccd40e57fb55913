"""AsyncLLMEngine in-process: deltas per request, abort on early close, the model
step off the event loop, and a failing step turning the server to 503."""

from __future__ import annotations

import asyncio
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


def test_deltas_add_up_and_closing_early_aborts(engine):
    async def scenario():
        async_engine = AsyncLLMEngine(engine)
        async_engine.start()
        try:
            deltas = [d async for d in async_engine.generate([request("a", 6), request("b", 4)])]
            per_request = {rid: sum(len(d.outputs[0].token_ids) for d in deltas if d.request_id == rid and d.outputs)
                           for rid in "ab"}
            assert per_request == {"a": 6, "b": 4}
            async with aclosing(async_engine.generate([request("c", 400)])) as stream:
                await anext(stream)
                assert async_engine.stats.kv_cache_usage > 0
            await _wait_idle(async_engine)
            assert not engine.has_unfinished_requests()
        finally:
            await async_engine.shutdown()

    asyncio.run(scenario())


def test_the_model_step_does_not_block_the_event_loop(engine, monkeypatch):
    real_step = engine.step

    def slow_step():
        time.sleep(0.05)  # releases the GIL, like a long model step
        return real_step()

    monkeypatch.setattr(engine, "step", slow_step)

    async def scenario():
        async_engine = AsyncLLMEngine(engine)
        async_engine.start()
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        ticking = asyncio.create_task(ticker())
        try:
            [d async for d in async_engine.generate([request("a", 10)])]
        finally:
            ticking.cancel()
            await async_engine.shutdown()
        return ticks

    # 10 steps of >= 50 ms: a blocked loop would tick about once per step.
    assert asyncio.run(scenario()) > 30


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
