"""A worker process killed mid-generation: the engine raises a clear error naming the
rank within seconds (never hangs), the server's engine turns unhealthy and fails
in-flight requests, another engine on the same host is untouched, and shutdown
leaves no process behind. A model that cannot be sharded fails at start-up, likewise."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil
import pytest

from transformers import LlamaConfig, LlamaForCausalLM

from pagedllm import LLM, SamplingParams
from pagedllm.engine.async_engine import AsyncLLMEngine, EngineDeadError
from pagedllm.engine.engine_core import EngineCoreRequest
from pagedllm.engine_args import EngineArgs
from pagedllm.executor.distributed import WorkerError
from tests.distributed.conftest import ENGINE_ARGS, MAX_MODEL_LEN, assert_same_outputs, child_pids, greedy_outputs, shutdown
from tests.tiny_models import save_tiny_model

pytestmark = pytest.mark.timeout(180)
MODEL = "llama-kv1-vocab321"
LONG = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
ERROR_WITHIN_S = 10


@pytest.fixture(scope="module")
def bystander(tiny_checkpoints):
    """An engine that keeps running on the same host while others' workers are killed."""
    llm = LLM(tiny_checkpoints[MODEL], tensor_parallel_size=2, **ENGINE_ARGS)
    yield llm, greedy_outputs(llm)
    shutdown(llm)


def _worker_pids(llm: LLM) -> list[int]:
    return [process.pid for process in llm.llm_engine.engine_core.executor.processes]


def _assert_gone(pids: list[int], children_before: set[int]) -> None:
    assert child_pids() <= children_before, "shutdown left processes behind"
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_killed_worker_raises_a_clear_error_and_leaves_nothing(tiny_checkpoints, bystander):
    children_before = child_pids()
    llm = LLM(tiny_checkpoints[MODEL], tensor_parallel_size=2, **ENGINE_ARGS)
    pids = _worker_pids(llm)
    engine = llm.llm_engine
    try:
        engine.add_request("long", {"prompt_token_ids": [5, 6, 7]}, LONG)
        for _ in range(3):
            engine.step()
        os.kill(pids[1], signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(WorkerError, match=rf"worker rank 1 died \(pid {pids[1]}, killed by SIGKILL\)"):
            while engine.has_unfinished_requests():
                engine.step()
        assert time.monotonic() - started < ERROR_WITHIN_S
        with pytest.raises(WorkerError, match="failed earlier"):
            engine.step()
    finally:
        shutdown(llm)
    _assert_gone(pids, children_before)
    bystander_llm, bystander_outputs = bystander
    assert_same_outputs(greedy_outputs(bystander_llm), bystander_outputs)


def test_killed_sampling_rank_fails_the_servers_requests(tiny_checkpoints):
    children_before = child_pids()
    config = EngineArgs(model=tiny_checkpoints[MODEL], tensor_parallel_size=2, **ENGINE_ARGS).create_engine_config()
    async_engine = AsyncLLMEngine(config)
    core = psutil.Process(async_engine.cores[0].process.pid)
    ranks = sorted(core.children(), key=lambda p: p.create_time())  # started in rank order
    pids = [core.pid] + [rank.pid for rank in ranks]
    longest = SamplingParams(temperature=0, max_tokens=MAX_MODEL_LEN - 3, ignore_eos=True)

    async def scenario() -> None:
        async_engine.start()
        try:
            stream = async_engine.generate([EngineCoreRequest("r", [5, 6, 7], longest, time.monotonic())])
            await anext(stream)
            os.kill(ranks[0].pid, signal.SIGKILL)  # rank 0 is the one that samples
            with pytest.raises(EngineDeadError, match="internal error"):
                async with asyncio.timeout(ERROR_WITHIN_S):
                    async for _ in stream:
                        pass
            assert not async_engine.is_healthy  # what /health reports as 503
        finally:
            await async_engine.shutdown()

    asyncio.run(scenario())
    _assert_gone(pids, children_before)


def test_an_unshardable_model_fails_at_start_up_and_leaves_nothing(tmp_path):
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=63, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    save_tiny_model(str(tmp_path), LlamaForCausalLM, config)
    children_before = child_pids()
    with pytest.raises(WorkerError, match="raised ValueError: 63 is not divisible by the tensor-parallel size 2"):
        LLM(str(tmp_path), tensor_parallel_size=2, **ENGINE_ARGS)
    assert child_pids() <= children_before
