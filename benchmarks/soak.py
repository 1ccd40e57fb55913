"""Soak test of `pagedllm serve`: many greedy completions at a fixed concurrency,
streaming and not, of mixed lengths, a share of them cancelled mid-stream, on a KV
pool small enough that requests are preempted.

Checks that every request not cancelled returns exactly what offline
`LLM.generate` returns for the same prompt and parameters (both in float32), that a
cancelled stream had received a prefix of it, and that afterwards the KV pool is
entirely free, nothing runs or waits, preemptions happened, the server's RSS (with
its engine-core processes, sampled once a second) peaked in the second half of the
traffic less than --max-rss-growth-mib above its peak in the first half, GET /metrics
answered within --max-scrape-ms (p99, scraped once a second during the traffic by a
process of its own, as Prometheus would), and SIGTERM stops it with exit code 0.
Prints the figures; exits 1 if any check fails.

    python benchmarks/soak.py MODEL [--requests 1000 --concurrency 64 --cancel-fraction 0.2]
    python benchmarks/soak.py MODEL --base-url http://127.0.0.1:8000   # a server already running

All traffic goes to 127.0.0.1 (or --base-url); every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx
import psutil

from pagedllm import LLM, SamplingParams

WORDS = ("the a of to and in is it that was for on are with as his they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how said an each she which do "
         "their time if will way about many then them write would like so these her long make thing see him "
         "two has look more day could go come did number sound no most people my over know water than call "
         "first who may down side been now find any new work part take get place made live where after back "
         "little only round man year came show every good me give our under name very through just form").split()
# A third of the prompts share this start, so the prefix cache is exercised under preemption.
PREAMBLE = "You are a careful assistant. Answer briefly and stay on topic. Here is the text: "
STARTUP_TIMEOUT_S = 300
IDLE_TIMEOUT_S = 60
REQUEST_TIMEOUT_S = 600


@dataclass(frozen=True)
class SoakRequest:
    prompt: str
    max_tokens: int
    ignore_eos: bool
    mode: str  # "plain", "stream", or "cancel": a stream closed after `cancel_after` chunks
    cancel_after: int = 0

    def body(self) -> dict:
        return {"prompt": self.prompt, "max_tokens": self.max_tokens, "temperature": 0,
                "ignore_eos": self.ignore_eos, "stream": self.mode != "plain"}


@dataclass
class Outcome:
    num_done: int = 0
    num_cancelled: int = 0
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    # (seconds since the traffic started, value), once a second while it runs:
    scrapes: list[tuple[float, float]] = field(default_factory=list)  # how long GET /metrics took, s
    rss: list[tuple[float, tuple[float, float]]] = field(default_factory=list)  # _rss_mib's pair


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="model folder, .gguf or alias (default: embedded)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--cancel-fraction", type=float, default=0.2, help="share of requests cancelled mid-stream")
    parser.add_argument("--stream-fraction", type=float, default=0.5, help="share of the others that stream")
    parser.add_argument("--num-kv-blocks", type=int, default=64, help="KV pool of the started server, in blocks")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128, help="longest completion asked for")
    parser.add_argument("--max-rss-growth-mib", type=float, default=64.0,
                        help="largest allowed growth of the server's RSS peak from the first half of the "
                        "traffic to the second")
    parser.add_argument("--base-url", default=None, help="use this running server instead of starting one")
    parser.add_argument("--server-pid", type=int, default=None, help="with --base-url: its pid, to measure RSS")
    parser.add_argument("--max-scrape-ms", type=float, default=50.0, help="bound on GET /metrics under load (p99)")
    parser.add_argument("--timeout", type=float, default=3600, help="bound on the whole soak, in seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", default=None, help="also write the figures to this file")
    parser.add_argument("--reference-file", default=None,
                        help="keep the offline outputs here: read when the file holds them for the same requests "
                        "(and model), else computed and written (saves the reference run when repeating a soak)")
    args = parser.parse_args(argv)
    if not (0 <= args.cancel_fraction <= 1 and 0 <= args.stream_fraction <= 1 and args.requests >= 1
            and args.concurrency >= 1 and args.max_tokens >= 16):
        parser.error("fractions must be in [0, 1], --requests and --concurrency >= 1, --max-tokens >= 16")
    return args


# ---- the workload ----------------------------------------------------------------------


def _prompt(rng: random.Random, tokenizer, max_prompt_tokens: int) -> str:
    """Text of a random length (short, medium or long) that fits max_prompt_tokens."""
    num_words = rng.choice([rng.randint(1, 8), rng.randint(10, 40), rng.randint(50, 150)])
    prefix = PREAMBLE if rng.random() < 1 / 3 else ""
    for _ in range(8):  # shrink until it fits
        text = prefix + " ".join(rng.choice(WORDS) for _ in range(num_words))
        num_tokens = len(tokenizer(text).input_ids)
        if num_tokens <= max_prompt_tokens:
            return text
        num_words = max(1, num_words * max_prompt_tokens // num_tokens - 1)
    return rng.choice(WORDS)


def build_requests(args: argparse.Namespace, tokenizer) -> list[SoakRequest]:
    rng = random.Random(args.seed)
    num_cancel = round(args.requests * args.cancel_fraction)
    cancelled = set(rng.sample(range(args.requests), num_cancel))
    requests = []
    for i in range(args.requests):
        prompt = _prompt(rng, tokenizer, args.max_model_len // 2)
        room = args.max_model_len - len(tokenizer(prompt).input_ids)
        max_tokens = min(room, rng.choice([rng.randint(1, 16), rng.randint(16, args.max_tokens)]))
        if i in cancelled:  # long enough to be cut in the middle
            max_tokens = min(room, rng.randint(16, args.max_tokens))
            requests.append(SoakRequest(prompt, max_tokens, True, "cancel", rng.randint(1, max_tokens // 2)))
        else:
            mode = "stream" if rng.random() < args.stream_fraction else "plain"
            requests.append(SoakRequest(prompt, max_tokens, rng.random() < 0.5, mode))
    return requests


def offline_texts(llm: LLM, requests: list[SoakRequest]) -> list[str]:
    params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=r.ignore_eos) for r in requests]
    return [output.outputs[0].text for output in llm.generate([r.prompt for r in requests], params)]


# ---- the server --------------------------------------------------------------------------


class Server:
    """`pagedllm serve` on a free port of 127.0.0.1, its log in a temporary file."""

    def __init__(self, args: argparse.Namespace) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="soak-server-", suffix=".log", delete=False)
        command = [sys.executable, "-m", "pagedllm", "serve", *([args.model] if args.model else []),
                   "--dtype", "float32", "--num-kv-blocks", str(args.num_kv_blocks), "--max-model-len",
                   str(args.max_model_len), "--max-waiting-requests", str(args.requests + args.concurrency),
                   "--port", str(port)]
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"the server did not start; its log: {self.log.name}")
            time.sleep(0.5)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -1


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _rss_mib(pid: int | None) -> tuple[float, float] | None:
    """(the server's RSS with its engine-core processes and their workers, the API
    server process's alone), in MiB."""
    if pid is None:
        return None
    server = psutil.Process(pid)
    own = server.memory_info().rss
    return (own + sum(p.memory_info().rss for p in server.children(recursive=True))) / 2**20, own / 2**20


def _metrics(url: str) -> dict[str, float]:
    """Prometheus samples by name (labels dropped: one model, summed over labels)."""
    values: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        match = re.fullmatch(r"([^{\s#]+)(?:\{.*\})?\s+(\S+)", line)
        if match:
            values[match.group(1)] = values.get(match.group(1), 0.0) + float(match.group(2))
    return values


def wait_idle(url: str) -> dict[str, float]:
    """The metrics once nothing runs, waits or holds blocks (or at the timeout)."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while True:
        metrics = _metrics(url)
        busy = sum(metrics.get(f"pagedllm:{name}", 0.0) for name in
                   ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"))
        if busy == 0 or time.monotonic() > deadline:
            return metrics
        time.sleep(0.2)


# ---- the traffic ---------------------------------------------------------------------------


async def _send(client: httpx.AsyncClient, request: SoakRequest) -> tuple[str, str]:
    """-> ("done" | "cancelled" | what went wrong, the text received)."""
    if request.mode == "plain":
        response = await client.post("/v1/completions", json=request.body())
        if response.status_code != 200:
            return f"HTTP {response.status_code}: {response.text[:200]}", ""
        return "done", response.json()["choices"][0]["text"]
    pieces: list[str] = []
    async with client.stream("POST", "/v1/completions", json=request.body()) as response:
        if response.status_code != 200:
            return f"HTTP {response.status_code}: {(await response.aread())[:200]!r}", ""
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                return f"error event: {event['error']['message']}", "".join(pieces)
            pieces += [choice["text"] for choice in event["choices"]]
            if request.mode == "cancel" and len(pieces) >= request.cancel_after:
                return "cancelled", "".join(pieces)  # leaving the block closes the connection
    return "done", "".join(pieces)


async def _one(client: httpx.AsyncClient, slots: asyncio.Semaphore, i: int, request: SoakRequest,
               expected: str | None, outcome: Outcome) -> None:
    async with slots:
        started = time.monotonic()
        try:
            result, text = await _send(client, request)
        except httpx.HTTPError as error:
            result, text = f"{type(error).__name__}: {error}", ""
        outcome.latencies.append(time.monotonic() - started)
    if result == "cancelled":
        outcome.num_cancelled += 1
        if expected is not None and not expected.startswith(text):
            outcome.failures.append(f"request {i}: cancelled stream diverged: {text!r} vs {expected!r}")
    elif result == "done":
        outcome.num_done += 1
        if expected is not None and text != expected:
            outcome.failures.append(f"request {i} ({request.mode}): {text!r} != offline {expected!r}")
    else:
        outcome.failures.append(f"request {i} ({request.mode}): {result}")


async def run_traffic(url: str, requests: list[SoakRequest], expected: list[str] | None, concurrency: int,
                      timeout: float, pid: int | None = None) -> Outcome:
    outcome = Outcome()
    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sampler = ServerSampler(url, pid)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
            jobs = [_one(client, slots, i, request, None if expected is None else expected[i], outcome)
                    for i, request in enumerate(requests)]
            await asyncio.wait_for(asyncio.gather(*jobs), timeout)
    finally:
        outcome.scrapes, outcome.rss = sampler.stop()
    return outcome


class ServerSampler:
    """Once a second while the traffic runs: what Prometheus sees under load (GET
    /metrics on its own connection) and the server's RSS. It runs in a process of its
    own, as a scraper does: in this one, the 256 client streams' event loop would add
    its own delays to the figures."""

    def __init__(self, url: str, pid: int | None) -> None:
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._results, sender = context.Pipe(duplex=False)
        self._process = context.Process(target=_sample_server, args=(url, pid, self._stop, sender), daemon=True)
        self._process.start()
        sender.close()
        if self._results.recv() != "ready":  # the first scrape is taken with the first requests
            raise RuntimeError("the metrics sampler did not start")

    def stop(self) -> tuple[list, list]:
        """-> (scrapes, RSS samples) as (seconds since the traffic started, value)."""
        self._stop.set()
        samples = self._results.recv()
        self._process.join()
        return samples


def _sample_server(url: str, pid: int | None, stop, results) -> None:
    scrapes: list[tuple[float, float]] = []
    rss_samples: list[tuple[float, tuple[float, float]]] = []
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as scraper:
        results.send("ready")
        traffic_started = time.perf_counter()
        while not stop.is_set():
            started = time.perf_counter()
            scraper.get("/metrics").raise_for_status()
            scrapes.append((started - traffic_started, time.perf_counter() - started))
            rss = _rss_mib(pid)
            if rss is not None:
                rss_samples.append((started - traffic_started, rss))
            stop.wait(1.0)
    results.send((scrapes, rss_samples))


# ---- the run -------------------------------------------------------------------------------


def _checks(args: argparse.Namespace, figures: dict, outcome: Outcome) -> list[str]:
    """The failed checks, in words."""
    failed = outcome.failures[:20] + ([f"... and {len(outcome.failures) - 20} more"]
                                      if len(outcome.failures) > 20 else [])
    if figures["kv_cache_usage_perc"] != 0 or figures["running"] != 0 or figures["waiting"] != 0:
        failed.append("the server is not idle: KV usage {kv_cache_usage_perc}, running {running}, "
                      "waiting {waiting}".format(**figures))
    if figures["preemptions"] == 0:
        failed.append("no request was preempted: make the KV pool smaller (--num-kv-blocks)")
    if figures["metrics_scrape_p99_ms"] > args.max_scrape_ms:
        failed.append(f"GET /metrics took {figures['metrics_scrape_p99_ms']} ms (p99) under load, more than "
                      f"{args.max_scrape_ms} ms")
    growth = figures["rss_growth_mib"]
    if growth is not None and growth > args.max_rss_growth_mib:
        failed.append(f"the server's RSS peak grew by {growth:.1f} MiB from the first half of the traffic to "
                      f"the second, more than {args.max_rss_growth_mib} MiB")
    if figures["exit_code"] not in (None, 0):
        failed.append(f"the server exited with {figures['exit_code']} after SIGTERM")
    return failed


def _soak(args: argparse.Namespace, url: str, pid: int | None, requests: list[SoakRequest],
          expected: list[str]) -> tuple[dict, Outcome]:
    """Warm-up (one request per connection, outputs checked too), then the soak."""
    warmup = [SoakRequest(r.prompt, r.max_tokens, r.ignore_eos, "plain") for r in requests[:args.concurrency]]
    warmed = asyncio.run(run_traffic(url, warmup, expected, args.concurrency, args.timeout))
    wait_idle(url)
    rss_before = _rss_mib(pid)
    started = time.monotonic()
    outcome = asyncio.run(run_traffic(url, requests, expected, args.concurrency, args.timeout, pid))
    elapsed = time.monotonic() - started
    outcome.failures = warmed.failures + outcome.failures
    metrics = wait_idle(url)
    rss_after = _rss_mib(pid)
    latencies = sorted(outcome.latencies)
    scrapes = sorted(took for _, took in outcome.scrapes)
    # A leak keeps growing; the heap's high-water mark (activations kept for reuse, see
    # platforms/cpu/memory.py) is reached once the traffic is at its heaviest and stays.
    halves = ([rss for at, rss in outcome.rss if at < elapsed / 2],
              [rss for at, rss in outcome.rss if at >= elapsed / 2])
    # Traffic too short to sample twice: from before the traffic to after it.
    first_half, second_half = (max(halves[0]), max(halves[1])) if all(halves) else (rss_before, rss_after)
    # The API server's own share of each peak, to tell which process grew.
    api_first, api_second = ((max(own for _, own in halves[0]), max(own for _, own in halves[1]))
                             if all(halves) else (None, None))
    usage = metrics.get("pagedllm:kv_cache_usage_perc", 0.0)
    figures = dict(
        requests=len(requests), done=outcome.num_done, cancelled=outcome.num_cancelled,
        failed=len(outcome.failures), seconds=round(elapsed, 1),
        latency_p50_s=round(latencies[len(latencies) // 2], 2), latency_max_s=round(latencies[-1], 2),
        metrics_scrape_p50_ms=round(1000 * scrapes[len(scrapes) // 2], 1),
        metrics_scrape_p99_ms=round(1000 * scrapes[int(0.99 * (len(scrapes) - 1))], 1),
        metrics_scrape_max_ms=round(1000 * scrapes[-1], 1),
        slowest_scrapes=", ".join(f"{1000 * took:.0f} ms at {at:.0f} s" for at, took in
                                  sorted(outcome.scrapes, key=lambda sample: -sample[1])[:3]),
        preemptions=int(metrics.get("pagedllm:num_preemptions_total", 0)),
        kv_cache_usage_perc=usage, running=int(metrics.get("pagedllm:num_requests_running", 0)),
        waiting=int(metrics.get("pagedllm:num_requests_waiting", 0)),
        blocks_free=None if args.base_url else f"{round(args.num_kv_blocks * (1 - usage))}/{args.num_kv_blocks}",
        rss_before_mib=None if rss_before is None else round(rss_before[0], 1),
        rss_peak_first_half_mib=None if first_half is None else round(first_half[0], 1),
        rss_peak_second_half_mib=None if second_half is None else round(second_half[0], 1),
        rss_after_mib=None if rss_after is None else round(rss_after[0], 1),
        rss_growth_mib=None if first_half is None else round(second_half[0] - first_half[0], 1),
        api_server_rss_peaks_mib=None if api_first is None else f"{api_first:.1f} -> {api_second:.1f}")
    return figures, outcome


def _stored_reference(args: argparse.Namespace, requests: list[SoakRequest]) -> list[str] | None:
    """The offline outputs kept in --reference-file for exactly these requests, if any."""
    if not args.reference_file or not os.path.exists(args.reference_file):
        return None
    with open(args.reference_file) as f:
        stored = json.load(f)
    same = stored["model"] == args.model and stored["requests"] == [r.body() for r in requests]
    return stored["texts"] if same else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    # A modest pool: the reference is the same with or without preemption.
    llm = LLM(model=args.model, dtype="float32", max_model_len=args.max_model_len, kv_cache_memory="1GiB")
    requests = build_requests(args, llm.get_tokenizer())
    expected = _stored_reference(args, requests)
    if expected is None:
        expected = offline_texts(llm, requests)
        if args.reference_file:
            with open(args.reference_file, "w") as f:
                json.dump({"model": args.model, "requests": [r.body() for r in requests], "texts": expected}, f)
    del llm
    print(f"offline reference: {len(requests)} requests in {time.monotonic() - started:.1f} s", flush=True)
    server = None if args.base_url else Server(args)
    url = args.base_url or server.url
    pid = args.server_pid if server is None else server.proc.pid
    try:
        figures, outcome = _soak(args, url, pid, requests, expected)
    finally:
        exit_code = None if server is None else server.stop()
    figures["exit_code"] = exit_code
    failed = _checks(args, figures, outcome)
    for name, value in figures.items():
        print(f"{name:>20}: {value}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({**figures, "failed_checks": failed}, f, indent=1)
    for line in failed:
        print(f"FAILED: {line}")
    if server is not None and failed:
        print(f"server log: {server.log.name}")
    elif server is not None:
        os.unlink(server.log.name)
    print("soak: PASSED" if not failed else "soak: FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
