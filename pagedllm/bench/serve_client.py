"""Serving benchmark: latency and throughput of any OpenAI-compatible /v1/completions
endpoint (pagedllm, vLLM, llama.cpp) under a given arrival rate.

Each request streams; the client timestamps every received chunk. Metrics follow
vLLM's benchmark_serving definitions so numbers are comparable across engines:
  TTFT  first chunk - send time
  ITL   gaps between consecutive chunks, pooled over all requests
  TPOT  (E2E - TTFT) / (output_tokens - 1), per request with > 1 output token
  E2E   last byte - send time
Throughputs divide by the wall time from the first send to the last completion.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

from pagedllm.bench.workload import BenchRequest, throughput_rates

# Long generations under heavy load may legitimately take a long time (vLLM uses 6 h).
REQUEST_TIMEOUT_S = 6 * 3600


@dataclass
class RequestRecord:
    """What the client observed for one request; times in seconds."""

    prompt_len: int
    success: bool = False
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    latency: float | None = None
    output_tokens: int = 0
    error: str = ""


def _stats(name: str, values_s: list[float]) -> dict:
    keys = [f"mean_{name}_ms", f"p50_{name}_ms", f"p99_{name}_ms"]
    if not values_s:
        return dict.fromkeys(keys)
    ms = np.asarray(values_s, dtype=float) * 1000.0
    return dict(zip(keys, (float(ms.mean()), float(np.percentile(ms, 50)),
                           float(np.percentile(ms, 99)))))


def summarize(records: list[RequestRecord], elapsed: float) -> dict:
    """Throughput and latency statistics over the successful requests."""
    if elapsed <= 0:
        raise ValueError(f"elapsed must be > 0, got {elapsed}")
    ok = [r for r in records if r.success]
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if not r.success})[:5],
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        **throughput_rates(len(ok), input_tokens, output_tokens, elapsed),
        **_stats("ttft", [r.ttft for r in ok]),
        **_stats("tpot", tpots),
        **_stats("itl", [gap for r in ok for gap in r.itl]),
        **_stats("e2e", [r.latency for r in ok]),
    }


def _handle_event(data: dict, record: RequestRecord, start: float, last: float) -> float:
    """Fold one SSE JSON event into `record`; returns the time of the latest chunk."""
    if not isinstance(data, dict):
        raise RuntimeError(f"unexpected stream event: {data!r:.200}")
    if "error" in data:
        raise RuntimeError(f"server error in stream: {data['error']}")
    if data.get("choices"):
        now = time.perf_counter()
        if record.ttft is None:
            record.ttft = now - start
        else:
            record.itl.append(now - last)
        record.output_tokens += 1  # chunk count; replaced by usage when the server sends it
        last = now
    usage = data.get("usage")
    if usage and usage.get("completion_tokens") is not None:
        record.output_tokens = usage["completion_tokens"]
    return last


async def _send(client: httpx.AsyncClient, url: str, model: str, req: BenchRequest,
                headers: dict) -> RequestRecord:
    record = RequestRecord(prompt_len=req.prompt_len)
    payload = {
        "model": model,
        "prompt": req.prompt_token_ids,
        "max_tokens": req.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")[:200]
                raise RuntimeError(f"HTTP {resp.status_code}: {body}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event: lines
                chunk = line[len("data:"):].strip()
                if chunk == "[DONE]":
                    break
                last = _handle_event(json.loads(chunk), record, start, last)
        if record.ttft is None:
            raise RuntimeError("the stream ended without any token")
        record.latency = time.perf_counter() - start
        record.success = True
    except (httpx.HTTPError, RuntimeError, ValueError) as e:
        # A failed request is a result of the benchmark, not a reason to stop it.
        record.error = f"{type(e).__name__}: {e}"
    return record


def _api_root(base_url: str) -> str:
    # Accept both http://host:port and http://host:port/v1 (the openai client's form).
    root = base_url.rstrip("/")
    return root.removesuffix("/v1")


async def first_model_id(client: httpx.AsyncClient, base_url: str, headers: dict) -> str:
    resp = await client.get(f"{_api_root(base_url)}/v1/models", headers=headers)
    resp.raise_for_status()
    models = resp.json().get("data") or []
    if not models:
        raise RuntimeError(f"{base_url}/v1/models lists no model")
    return models[0]["id"]


async def run_serve_benchmark(
    base_url: str,
    model: str | None,
    requests: list[BenchRequest],
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    api_key: str | None = None,
    seed: int = 0,
) -> dict:
    """Send `requests` in order, all at once (rate inf) or as a Poisson process of
    `request_rate` requests/s, with at most `max_concurrency` in flight."""
    if not requests:
        raise ValueError("the workload is empty")
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 (or inf), got {request_rate}")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # httpx pools at most 100 connections by default; the surplus would wait in the
    # client and be charged to the server's TTFT, so the pool must not be the limit.
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=None)
    rng = random.Random(seed)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        model = model or await first_model_id(client, base_url, headers)
        url = f"{_api_root(base_url)}/v1/completions"

        async def one(req: BenchRequest) -> RequestRecord:
            if gate is None:
                return await _send(client, url, model, req, headers)
            async with gate:
                return await _send(client, url, model, req, headers)

        tasks = []
        start = time.perf_counter()
        for i, req in enumerate(requests):
            if i and math.isfinite(request_rate):
                await asyncio.sleep(rng.expovariate(request_rate))
            tasks.append(asyncio.create_task(one(req)))
        records = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start

    return {
        "label": f"serve rate={request_rate} conc={max_concurrency or 'inf'}",
        "backend": "openai-completions",
        "base_url": base_url,
        "model": model,
        "request_rate": request_rate,
        "max_concurrency": max_concurrency,
        "num_requests": len(requests),
        **summarize(records, elapsed),
        # Per request, in workload order, for later analysis (as vLLM's result files).
        "per_request": [
            {"prompt_len": r.prompt_len, "output_tokens": r.output_tokens, "ttft_s": r.ttft,
             "latency_s": r.latency, "error": r.error}
            for r in records
        ],
    }
