"""The soak script (benchmarks/soak.py) in a short configuration: 60 requests at
concurrency 16, a fifth cancelled mid-stream, a KV pool of 20 blocks (320 tokens)
so that requests are preempted; it checks every output against offline generation,
the pool entirely free afterwards, and the server's RSS growth."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SOAK_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "soak.py")
NUM_REQUESTS = 60
MAX_RSS_GROWTH_MIB = 64


def test_short_soak_with_cancellations_and_preemption(tiny_model_dir, tmp_path):
    figures_path = tmp_path / "soak.json"
    command = [sys.executable, SOAK_SCRIPT, tiny_model_dir, "--requests", str(NUM_REQUESTS), "--concurrency", "16",
               "--cancel-fraction", "0.2", "--max-tokens", "32", "--max-model-len", "256", "--num-kv-blocks", "20",
               "--max-rss-growth-mib", str(MAX_RSS_GROWTH_MIB), "--timeout", "180", "--json-out", str(figures_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    figures = json.loads(figures_path.read_text())
    assert figures["failed_checks"] == []
    assert figures["done"] + figures["cancelled"] == NUM_REQUESTS and figures["cancelled"] == NUM_REQUESTS // 5
    assert figures["preemptions"] > 0 and figures["blocks_free"] == "20/20"
    assert figures["running"] == figures["waiting"] == 0 and figures["exit_code"] == 0
    assert figures["rss_growth_mib"] <= MAX_RSS_GROWTH_MIB
