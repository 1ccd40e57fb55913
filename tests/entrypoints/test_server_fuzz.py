"""Hostile input generated from the server's own /openapi.json by schemathesis (its
command line, as a reviewer would run it): boundary and invalid values for every
field of every operation (coverage phase) plus random valid and invalid bodies
(fuzzing phase). No 5xx, every answer as documented (status, content type, headers,
body, each event of a stream), and the server healthy and idle afterwards."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.entrypoints.conftest import API_KEY, metric_value, start_server

CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance"]
# About 750 requests in all, about half a minute on 2 busy cores; fixed seed: reproducible.
EXAMPLES_PER_OPERATION = 20
SEED = 1
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tiny_model_dir):
    """Small limits, so that any valid request the fuzzer makes is cheap to serve."""
    process = start_server(tmp_path_factory, [tiny_model_dir, "--dtype", "float32", "--num-kv-blocks", "32",
                                              "--max-model-len", "64", "--max-n", "2", "--max-logprobs", "2",
                                              "--api-key", API_KEY], "fuzz-server")
    yield process
    assert process.stop(signal.SIGTERM) == 0


def test_generated_requests_get_documented_answers_and_no_server_error(fuzz_server, tmp_path):
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{fuzz_server.url}/openapi.json",
               "--checks", ",".join(CHECKS), "--phases", "coverage,fuzzing",
               "--max-examples", str(EXAMPLES_PER_OPERATION), "--seed", str(SEED), "--request-timeout", "30",
               "--header", f"Authorization: Bearer {API_KEY}"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    summary = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert summary and summary.group(1) == summary.group(2) and int(summary.group(1)) >= 300, run.stdout[-2000:]
    print(f"schemathesis: {summary.group(0)}")
    _check_healthy_and_idle(fuzz_server.url)


def _check_healthy_and_idle(url: str) -> None:
    assert httpx.get(f"{url}/health").status_code == 200
    deadline = time.monotonic() + 30
    while True:
        metrics = httpx.get(f"{url}/metrics").text
        busy = [name for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
                if metric_value(metrics, f"pagedllm:{name}") != 0]
        if not busy:
            return
        assert time.monotonic() < deadline, f"still busy after the fuzzing: {busy}"
        time.sleep(0.1)
