"""`pagedllm bench throughput`: the offline engine on a whole workload at once.

All requests are submitted together (ignore_eos, max_tokens = each request's
output length); reports requests/s, total and output tokens/s, start-up time,
peak RSS and KV-cache waste (share of allocated KV slots holding no token,
sampled after every step).
"""

from __future__ import annotations

import argparse
import resource
import time

import psutil

from pagedllm.bench.cli import add_output_args, add_run_info, add_workload_args, finish_report, load_requests
from pagedllm.bench.workload import BenchRequest, num_output_tokens, num_prompt_tokens, throughput_rates
from pagedllm.entrypoints.cli_args import add_engine_args, engine_kwargs


def run_throughput(requests: list[BenchRequest], **engine_kwargs) -> dict:
    from pagedllm import SamplingParams
    from pagedllm.engine.llm_engine import LLMEngine

    process_start = psutil.Process().create_time()
    started = time.time()
    engine = LLMEngine.from_args(**engine_kwargs)
    ready = time.time()
    for i, request in enumerate(requests):
        params = SamplingParams(temperature=0, max_tokens=request.output_len, ignore_eos=True)
        # Streamed outputs: every step reports progress, so the first token is seen when it comes.
        engine.add_tokenized_request(str(i), None, request.prompt_token_ids, params, stream=True)
    unfilled = used = 0
    first_token_time = None
    num_steps = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        num_steps += 1
        if first_token_time is None and outputs:
            first_token_time = time.time()
        stats = engine.engine_core.stats()
        unfilled += stats.num_unfilled_slots
        used += stats.num_used_slots
    elapsed = time.time() - ready
    prompt_tokens, output_tokens = num_prompt_tokens(requests), num_output_tokens(requests)
    dtype, kv_dtype = engine.config.model.dtype, engine.config.cache.kv_dtype(engine.config.model.dtype)
    return {
        "label": f"pagedllm {dtype}" + (f", KV {kv_dtype}" if kv_dtype != dtype else ""), "backend": "pagedllm",
        "model": engine.config.model.path, "dtype": dtype, "kv_cache_dtype": kv_dtype,
        "device": engine.config.model.device, "num_requests": len(requests),
        "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "num_steps": num_steps,
        **throughput_rates(len(requests), prompt_tokens, output_tokens, elapsed),
        "engine_init_s": ready - started,
        "startup_to_first_token_s": (first_token_time or ready) - process_start,
        "kv_cache_waste": unfilled / used if used else 0.0,
        "kv_cache_blocks": engine.engine_core.num_blocks,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def _cmd_throughput(args: argparse.Namespace) -> None:
    requests = load_requests(args)
    result = run_throughput(requests, **engine_kwargs(args))
    add_run_info(args, result)
    finish_report(args, result, "pagedllm offline throughput", [
        ("Model / dtype / KV dtype",
         f"{result['model'].rsplit('/', 1)[-1]} / {result['dtype']} / {result['kv_cache_dtype']}"),
        ("Requests", result["num_requests"]), ("Prompt tokens", result["prompt_tokens"]),
        ("Output tokens", result["output_tokens"]), ("Steps", result["num_steps"]),
        ("Elapsed (s)", result["elapsed_s"]), ("Requests/s", result["requests_per_s"]),
        ("Output tok/s", result["output_tokens_per_s"]), ("Total tok/s", result["total_tokens_per_s"]),
        ("Engine init (s)", result["engine_init_s"]),
        ("Process start -> first token (s)", result["startup_to_first_token_s"]),
        ("KV-cache waste (%)", 100 * result["kv_cache_waste"]),
        ("Peak RSS (GiB)", result["peak_rss_gib"]),
    ])


def add_throughput_parser(bench_subparsers) -> None:
    # One --seed serves both the engine and the random workload.
    parser = bench_subparsers.add_parser("throughput", help="offline engine throughput on a workload",
                                         conflict_handler="resolve")
    add_engine_args(parser)
    add_workload_args(parser)
    add_output_args(parser)
    parser.set_defaults(func=_cmd_throughput)
