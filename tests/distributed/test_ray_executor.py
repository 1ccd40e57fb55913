"""The Ray backend on a local Ray cluster: ranks as actors in a placement group give
the same greedy outputs as one process, and a killed actor is a clear error."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pagedllm import LLM
from pagedllm.executor.distributed import WorkerError
from tests.distributed.conftest import ENGINE_ARGS, assert_same_outputs, greedy_outputs, shutdown

pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(300)
MODEL = "llama-kv1-vocab321"


@pytest.fixture(scope="module")
def ray_llm(ray_cluster, tiny_checkpoints):
    llm = LLM(tiny_checkpoints[MODEL], tensor_parallel_size=2, distributed_executor_backend="ray", **ENGINE_ARGS)
    yield llm
    shutdown(llm)


def test_ray_tp2_equals_tp1(tiny_checkpoints, ray_llm):
    reference = greedy_outputs(LLM(tiny_checkpoints[MODEL], **ENGINE_ARGS))
    assert_same_outputs(greedy_outputs(ray_llm), reference)


def test_a_killed_actor_is_a_clear_error(ray_llm):
    executor = ray_llm.llm_engine.engine_core.executor
    executor.check_health()
    os.kill(executor.pids[1], signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(WorkerError, match="worker rank 1 died"):
        greedy_outputs(ray_llm)
    assert time.monotonic() - started < 30
    with pytest.raises(WorkerError):
        executor.check_health()
