"""Prefix-aware against round-robin routing across data-parallel replicas, on a
multi-tenant workload: several tenants, each with its own long system prompt, many
users each sending a short question after it.

For each policy, starts `pagedllm serve MODEL -dp N --data-parallel-routing POLICY`
(a fresh server, the same flags otherwise), sends the same requests as Poisson
arrivals through the same client as `pagedllm bench serve`, and reads the prefix
cache hit rate from /metrics (in all and per replica). Each replica's KV pool is
sized to hold three quarters of the tenants' system prompts: prefix-aware
routing keeps each tenant on one replica, where its prompt stays cached; round-robin
sends every tenant to every replica, where the prompts evict one another.

    python benchmarks/dp_routing.py [MODEL] [--tenants 8 --system-len 512 --users 8 --request-rate 2]

Prints one table (hit rate, TTFT mean/p99, TPOT mean, output tok/s per policy) and
writes the JSON of both runs with --json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import socket
import subprocess
import sys
import time

import httpx

from pagedllm.bench.serve_client import run_serve_benchmark
from pagedllm.bench.workload import FIRST_NON_SPECIAL_ID, BenchRequest
from pagedllm.engine.dp_router import ROUTING_POLICIES

STARTUP_TIMEOUT_S = 300
BLOCK_SIZE = 16


def multi_tenant_workload(tenants: int, system_len: int, users: int, question_len: int, output_len: int,
                          seed: int) -> list[BenchRequest]:
    """tenants x users requests, the tenants interleaved in a random order."""
    rng = random.Random(seed)
    vocab = range(FIRST_NON_SPECIAL_ID, 49152)
    systems = [[rng.choice(vocab) for _ in range(system_len)] for _ in range(tenants)]
    requests = [BenchRequest(system + [rng.choice(vocab) for _ in range(question_len)], output_len)
                for system in systems for _ in range(users)]
    rng.shuffle(requests)
    return requests


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metric_sum(text: str, name: str, replica: str | None = None) -> float:
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(rf'{re.escape(name)}\{{([^}}]*)\}}\s+(\S+)', line)
        if match and (replica is None or f'replica="{replica}"' in match.group(1)):
            total += float(match.group(2))
    return total


def run_policy(args: argparse.Namespace, policy: str, requests: list[BenchRequest]) -> dict:
    port = _free_port()
    command = [sys.executable, "-m", "pagedllm", "serve", *([args.model] if args.model else []),
               "--port", str(port), "--dtype", args.dtype, "--data-parallel-size", str(args.data_parallel_size),
               "--data-parallel-routing", policy, "--num-kv-blocks", str(args.kv_blocks_per_replica),
               "--max-model-len", str(args.max_model_len), "--log-level", "warning"]
    server = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {' '.join(command)}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        result = asyncio.run(run_serve_benchmark(url, None, requests, args.request_rate, seed=args.seed))
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    replicas = [str(r) for r in range(args.data_parallel_size)]
    queries = _metric_sum(metrics, "pagedllm:prefix_cache_queries_total")
    hits = _metric_sum(metrics, "pagedllm:prefix_cache_hits_total")
    result["policy"] = policy
    result["prefix_cache_hit_rate"] = hits / queries if queries else 0.0
    result["per_replica"] = {
        replica: {"queried_tokens": _metric_sum(metrics, "pagedllm:dp_replica_prefix_cache_queries_total", replica),
                  "hit_tokens": _metric_sum(metrics, "pagedllm:dp_replica_prefix_cache_hits_total", replica)}
        for replica in replicas}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="model to serve (default: the embedded one)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--data-parallel-size", type=int, default=2)
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--system-len", type=int, default=512, help="tokens of each tenant's system prompt")
    parser.add_argument("--users", type=int, default=8, help="requests per tenant")
    parser.add_argument("--question-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--request-rate", type=float, default=2.0, help="Poisson arrivals per second")
    parser.add_argument("--kv-blocks-per-replica", type=int, default=None,
                        help="default: room for 3/4 of the tenants' system prompts plus 8 running requests")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    if args.kv_blocks_per_replica is None:
        # Three quarters of all system prompts, plus the private blocks of 8 running requests:
        # half the tenants' prompts fit with room to spare, all of them do not.
        system_blocks = args.system_len // BLOCK_SIZE
        private_blocks = (args.question_len + args.output_len) // BLOCK_SIZE + 2
        args.kv_blocks_per_replica = 3 * args.tenants * system_blocks // 4 + 8 * private_blocks
    requests = multi_tenant_workload(args.tenants, args.system_len, args.users, args.question_len, args.output_len,
                                     args.seed)
    print(f"workload: {args.tenants} tenants x {args.users} users, system prompt {args.system_len} tokens, "
          f"question {args.question_len}, output {args.output_len}; {args.request_rate} req/s; "
          f"-dp {args.data_parallel_size}, {args.kv_blocks_per_replica} KV blocks of {BLOCK_SIZE} per replica",
          flush=True)
    results = [run_policy(args, policy, requests) for policy in ROUTING_POLICIES]
    print(f"{'routing':<12} {'hit rate':>8} {'TTFT mean':>10} {'TTFT p99':>9} {'TPOT mean':>10} {'out tok/s':>9}  "
          "hit rate per replica")
    for r in results:
        per_replica = ", ".join(f"{v['hit_tokens'] / v['queried_tokens']:.0%}" if v["queried_tokens"] else "-"
                                for v in r["per_replica"].values())
        print(f"{r['policy']:<12} {r['prefix_cache_hit_rate']:>8.1%} {r['mean_ttft_ms']:>8.0f}ms "
              f"{r['p99_ttft_ms']:>7.0f}ms {r['mean_tpot_ms']:>8.1f}ms {r['output_tokens_per_s']:>9.1f}  {per_replica}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
