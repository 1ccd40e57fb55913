"""`pagedllm serve --data-parallel-size 2`: two engine-core processes behind one
endpoint give the offline engine's greedy outputs, requests sharing a system prompt
go to the replica that caches it (every one after the first is a prefix-cache hit),
and /metrics shows each replica's load and hits."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory, tiny_model_dir):
    process = start_server(tmp_path_factory, [tiny_model_dir, "--dtype", "float32", "--num-kv-blocks", "64",
                                              "--data-parallel-size", "2"], "dp-server")
    yield process
    assert process.stop(signal.SIGINT) == 0


def test_two_engine_core_processes_serve_one_endpoint(dp_server):
    children = psutil.Process(dp_server.proc.pid).children(recursive=True)
    assert sum("spawn_main" in " ".join(child.cmdline()) for child in children) == 2
    assert "in each of 2 data-parallel replicas (prefix routing)" in dp_server.log


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
