"""run_serve_benchmark against a real HTTP server on 127.0.0.1 (conftest's fake)."""

import asyncio
import random

import pytest

from pagedllm.bench.serve_client import run_serve_benchmark
from pagedllm.bench.workload import BenchRequest

OUTPUT_LENS = [1, 2, 3, 5, 8, 4]
REQUESTS = [BenchRequest(list(range(20, 20 + 3 * i + 1)), n) for i, n in enumerate(OUTPUT_LENS)]


def bench(server, requests=REQUESTS, **kwargs):
    kwargs.setdefault("model", "fake-model")
    return asyncio.run(run_serve_benchmark(server.base_url, requests=requests, **kwargs))


def test_all_at_once(fake_server):
    r = bench(fake_server)
    assert r["completed"] == len(REQUESTS) and r["failed"] == 0
    assert r["total_output_tokens"] == sum(OUTPUT_LENS)
    assert r["total_input_tokens"] == sum(req.prompt_len for req in REQUESTS)
    for rec, req in zip(r["per_request"], REQUESTS):
        assert rec["output_tokens"] == req.output_len
        assert 0 < rec["ttft_s"] <= rec["latency_s"]
    assert r["mean_ttft_ms"] <= r["mean_e2e_ms"] and r["p99_ttft_ms"] <= r["p99_e2e_ms"]
    assert r["output_tokens_per_s"] > 0 and r["total_tokens_per_s"] > r["output_tokens_per_s"]
    assert r["mean_tpot_ms"] > 0 and r["mean_itl_ms"] > 0


def test_request_payload_and_model_discovery(fake_server):
    r = bench(fake_server, model=None)
    assert r["model"] == "fake-model"
    by_len = {p["max_tokens"]: p for p in fake_server.payloads}
    for req in REQUESTS:
        p = by_len[req.output_len]
        assert p["prompt"] == req.prompt_token_ids
        assert p["model"] == "fake-model"
        assert p["stream"] is True and p["ignore_eos"] is True and p["temperature"] == 0
        assert p["stream_options"] == {"include_usage": True}


def test_counts_chunks_without_usage(fake_server):
    fake_server.send_usage = False
    r = bench(fake_server)
    assert r["completed"] == len(REQUESTS)
    assert r["total_output_tokens"] == sum(OUTPUT_LENS)


def test_max_concurrency(fake_server):
    fake_server.token_delay_s = 0.01
    r = bench(fake_server, max_concurrency=2)
    assert r["completed"] == len(REQUESTS)
    assert fake_server.max_in_flight == 2


def test_poisson_arrivals_are_spaced(fake_server):
    rate, seed = 40.0, 3
    r = bench(fake_server, request_rate=rate, seed=seed)
    rng = random.Random(seed)
    gaps = sum(rng.expovariate(rate) for _ in REQUESTS[1:])
    assert r["completed"] == len(REQUESTS)
    assert r["elapsed_s"] >= gaps  # the last request cannot be sent before its arrival
    assert r["request_rate"] == rate


def test_failures_are_counted_not_raised(fake_server):
    requests = REQUESTS[:2] + [BenchRequest([20, 21], 1001)]
    r = bench(fake_server, requests=requests)
    assert r["completed"] == 2 and r["failed"] == 1
    assert r["total_output_tokens"] == OUTPUT_LENS[0] + OUTPUT_LENS[1]
    assert any("HTTP 400" in e for e in r["errors"])
    assert r["per_request"][2]["ttft_s"] is None


def test_api_key_and_v1_base_url(fake_server):
    fake_server.api_key = "secret"
    r = asyncio.run(run_serve_benchmark(fake_server.base_url + "/v1/", "fake-model",
                                        REQUESTS[:2], api_key="secret"))
    assert r["completed"] == 2
    r = bench(fake_server, requests=REQUESTS[:2])
    assert r["completed"] == 0 and any("HTTP 401" in e for e in r["errors"])


def test_unreachable_server_fails_every_request():
    r = asyncio.run(run_serve_benchmark("http://127.0.0.1:9", "m", REQUESTS[:2]))
    assert r["completed"] == 0 and r["failed"] == 2
    assert r["mean_ttft_ms"] is None


@pytest.mark.parametrize("kwargs", [{"request_rate": 0}, {"max_concurrency": 0}])
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        asyncio.run(run_serve_benchmark("http://127.0.0.1:9", "m", REQUESTS, **kwargs))
