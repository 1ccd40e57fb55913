"""`pagedllm serve --data-parallel-size 2`, its engine cores local processes (mp) or Ray
actors (ray, on a local Ray cluster the test starts): behind one endpoint they give the
offline engine's greedy outputs, requests sharing a system prompt go to the replica that
caches it (every one after the first is a prefix-cache hit), /metrics shows each
replica's load and hits, and a killed replica turns /health 503 and ends a stream in
flight with an error event, never a hang; stopping the server leaves no core behind."""

from __future__ import annotations

import json
import os
import re
import signal

import httpx
import openai
import psutil
import pytest

from pagedllm import LLM, SamplingParams
from tests.entrypoints.conftest import metric_value, start_server

pytestmark = pytest.mark.timeout(300)
BLOCK_SIZE = 16
# Two tenants' system prompts, 4 full blocks each, and short user turns after them.
SYSTEMS = [list(range(100, 164)), list(range(200, 264))]
USERS = [[7, 8, 9 + user] for user in range(5)]
MAX_TOKENS = 6


@pytest.fixture(scope="module", params=["mp", "ray"])
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def dp_server(request, backend, tmp_path_factory, tiny_model_dir):
    env = {"RAY_ADDRESS": request.getfixturevalue("ray_cluster")} if backend == "ray" else None
    process = start_server(tmp_path_factory, [tiny_model_dir, "--dtype", "float32", "--num-kv-blocks", "64",
                                              "--data-parallel-size", "2", "--distributed-executor-backend", backend],
                           f"dp-server-{backend}", env)
    yield process
    cores = [psutil.Process(pid) for pid in core_pids(process) if psutil.pid_exists(pid)]
    assert process.stop(signal.SIGINT) == 0
    _, alive = psutil.wait_procs(cores, timeout=30)
    assert not alive, [core.pid for core in alive]


def core_pids(server) -> list[int]:
    """Each replica's engine-core pid (with ray, its actor's worker process), from the server's log."""
    return [int(pid) for pid in re.search(r"engine cores in pid ([\d, ]+);", server.log).group(1).split(", ")]


def test_each_replica_is_an_engine_core_process_or_ray_actor(dp_server, backend):
    assert "in each of 2 data-parallel replicas (prefix routing)" in dp_server.log
    children = psutil.Process(dp_server.proc.pid).children(recursive=True)
    spawned = {child.pid for child in children if "spawn_main" in " ".join(child.cmdline())}
    pids = set(core_pids(dp_server))
    assert len(pids) == 2
    if backend == "mp":
        assert spawned == pids
    else:  # Ray worker processes, started by the cluster, not by the server
        assert not spawned
        assert all("CoreActor" in " ".join(psutil.Process(pid).cmdline()) for pid in pids)


def test_shared_prefixes_follow_their_replica_and_outputs_match_offline(dp_server, tiny_model_dir):
    client = openai.OpenAI(base_url=f"{dp_server.url}/v1", api_key="none", max_retries=0)
    prompts = [system + user for user in USERS for system in SYSTEMS]  # the tenants interleaved
    served, cached = [], []
    for prompt in prompts:
        response = client.completions.create(model=tiny_model_dir, prompt=prompt, max_tokens=MAX_TOKENS,
                                             temperature=0, extra_body={"ignore_eos": True})
        served.append(response.choices[0].text)
        cached.append(response.usage.prompt_tokens_details.cached_tokens)
    # Each system prompt is computed once, on one replica; every later request of its tenant is routed there.
    assert cached[:2] == [0, 0]
    assert cached[2:] == [len(SYSTEMS[0])] * (len(prompts) - 2)

    llm = LLM(tiny_model_dir, dtype="float32", num_kv_blocks=64)
    offline = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)
    assert served == [output.outputs[0].text for output in offline]


def test_metrics_show_each_replicas_share(dp_server):
    text = httpx.get(f"{dp_server.url}/metrics").text
    hits = [metric_value(text, "pagedllm:dp_replica_prefix_cache_hits_total", replica=str(r)) for r in (0, 1)]
    queries = [metric_value(text, "pagedllm:dp_replica_prefix_cache_queries_total", replica=str(r)) for r in (0, 1)]
    assert all(q > 0 for q in queries) and all(h > 0 for h in hits)
    assert sum(hits) == metric_value(text, "pagedllm:prefix_cache_hits_total")
    for replica in ("0", "1"):
        assert metric_value(text, "pagedllm:dp_replica_num_requests_running", replica=replica) == 0


def test_a_killed_replica_ends_the_stream_in_flight_and_health(dp_server, tiny_model_dir):
    """Last: the server stays unhealthy."""
    body = {"model": tiny_model_dir, "prompt": [5, 6, 7], "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{dp_server.url}/v1/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: {")  # its first token: it runs on one replica
        metrics = httpx.get(f"{dp_server.url}/metrics").text
        running = [metric_value(metrics, "pagedllm:dp_replica_num_requests_running", replica=str(r)) for r in (0, 1)]
        replica = running.index(1)
        # Killed, its replica makes no more tokens: the stream can only end by the death being noticed.
        os.kill(core_pids(dp_server)[replica], signal.SIGKILL)
        rest = [line for line in lines if line]
    errors = [json.loads(line[6:])["error"] for line in rest if line.startswith('data: {"error"')]
    assert rest[-1] == "data: [DONE]" and errors, rest[-3:]
    assert errors[0]["code"] == "engine_dead" and f"engine core {replica}" in errors[0]["message"], errors
    # The stream ended when the engine turned unhealthy: no wait is needed.
    assert httpx.get(f"{dp_server.url}/health").status_code == 503
    after = httpx.post(f"{dp_server.url}/v1/completions", json={"model": tiny_model_dir, "prompt": "Hi"})
    assert after.status_code == 503 and after.json()["error"]["code"] == "engine_dead"
