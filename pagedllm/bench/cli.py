"""`pagedllm bench hf-baseline | serve | plot`: the benchmarks that need no engine.

`add_workload_args` / `workload_from_args` are shared with the engine's
`bench throughput`, so every benchmark selects its workload the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os

from pagedllm.bench.report import format_table, plot, read_json, write_json
from pagedllm.bench.workload import BenchRequest, load_workload, random_workload

SMOLLM2_VOCAB_SIZE = 49152


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload (a file, or random prompts)")
    g.add_argument("--workload", metavar="FILE",
                   help='JSON workload: {"meta": {...}, "requests": [{"prompt_token_ids", '
                        '"output_len"}, ...]}')
    g.add_argument("--random-input-len", type=int, metavar="N", help="prompt tokens per request")
    g.add_argument("--random-output-len", type=int, metavar="N", help="output tokens per request")
    g.add_argument("--num-prompts", type=int, metavar="N", help="number of random requests")
    g.add_argument("--random-vocab-size", type=int, default=SMOLLM2_VOCAB_SIZE, metavar="V",
                   help="random ids are drawn from [17, V) (default: SmolLM2's %(default)s)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the random prompts and of Poisson arrivals")
    g.add_argument("--limit", type=int, metavar="N", help="keep only the first N requests")


def workload_from_args(args: argparse.Namespace) -> list[BenchRequest]:
    """The requests selected by add_workload_args' flags; ValueError if they conflict."""
    random_flags = {
        "--random-input-len": args.random_input_len,
        "--random-output-len": args.random_output_len,
        "--num-prompts": args.num_prompts,
    }
    given = [flag for flag, value in random_flags.items() if value is not None]
    if args.workload:
        if given:
            raise ValueError(f"--workload excludes {', '.join(given)}")
        return load_workload(args.workload, args.limit)
    if len(given) != len(random_flags):
        raise ValueError("give --workload FILE, or all of " + ", ".join(random_flags))
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    requests = random_workload(args.num_prompts, args.random_input_len,
                               args.random_output_len, args.random_vocab_size, args.seed)
    return requests[: args.limit]


def describe_workload(args: argparse.Namespace) -> str:
    if args.workload:
        source = args.workload
    else:
        source = (f"random(in={args.random_input_len}, out={args.random_output_len}, "
                  f"n={args.num_prompts}, seed={args.seed})")
    return source if args.limit is None else f"{source}[:{args.limit}]"


def load_requests(args: argparse.Namespace) -> list[BenchRequest]:
    try:
        return workload_from_args(args)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from e


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--label", help="name of this run in tables and plots")
    parser.add_argument("--json", metavar="OUT", help="write the result as JSON")
    parser.add_argument("--png", metavar="OUT", help="write a throughput bar chart")


def finish_report(args: argparse.Namespace, result: dict, title: str, rows: list) -> None:
    print(format_table(title, rows))
    if args.json:
        write_json(args.json, result)
    if args.png:
        plot([result], args.png)


def add_run_info(args: argparse.Namespace, result: dict) -> None:
    import torch

    from pagedllm.platforms.cpu.isa import cpu_features

    result["workload"] = describe_workload(args)
    # Figures are only comparable on one machine: name its CPU and the threads used.
    result["cpu"] = cpu_features().describe()
    result["cpu_threads"] = torch.get_num_threads()
    if args.label:
        result["label"] = args.label


def _cmd_hf_baseline(args: argparse.Namespace) -> None:
    # Imported here: torch + transformers take seconds to import and `serve` needs neither.
    from pagedllm.bench.hf_baseline import run_hf_baseline

    requests = load_requests(args)
    try:
        r = run_hf_baseline(args.model, requests, args.batch_size, args.dtype, args.device)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from e
    add_run_info(args, r)
    finish_report(args, r, "HF static batching", [
        ("Model", os.path.basename(r["model"])),
        ("Device / dtype", f"{r['device']} / {r['dtype']}"),
        ("Batch size", r["batch_size"]), ("Requests", r["num_requests"]),
        ("Prompt tokens", r["prompt_tokens"]), ("Output tokens", r["output_tokens"]),
        ("Generated tokens (incl. padding)", r["generated_tokens"]),
        ("Elapsed (s)", r["elapsed_s"]), ("Requests/s", r["requests_per_s"]),
        ("Output tok/s", r["output_tokens_per_s"]), ("Total tok/s", r["total_tokens_per_s"]),
    ])


def _latency_rows(r: dict) -> list:
    rows = []
    for name, title in [("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E")]:
        rows += [(f"{stat.capitalize()} {title} (ms)", r[f"{stat}_{name}_ms"])
                 for stat in ("mean", "p50", "p99")]
    return rows


def _cmd_serve(args: argparse.Namespace) -> None:
    from pagedllm.bench.serve_client import run_serve_benchmark

    requests = load_requests(args)
    try:
        r = asyncio.run(run_serve_benchmark(args.base_url, args.model, requests,
                                            args.request_rate, args.max_concurrency,
                                            args.api_key, args.seed))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    add_run_info(args, r)
    finish_report(args, r, "Serving benchmark", [
        ("Model", r["model"]), ("Request rate (req/s)", r["request_rate"]),
        ("Max concurrency", r["max_concurrency"]),
        ("Successful requests", r["completed"]), ("Failed requests", r["failed"]),
        ("Duration (s)", r["elapsed_s"]), ("Input tokens", r["total_input_tokens"]),
        ("Output tokens", r["total_output_tokens"]), ("Requests/s", r["requests_per_s"]),
        ("Output tok/s", r["output_tokens_per_s"]), ("Total tok/s", r["total_tokens_per_s"]),
        *_latency_rows(r),
    ])
    for error in r["errors"]:
        print(f"error (sample): {error}")
    if r["completed"] == 0:
        raise SystemExit("error: every request failed")


def _cmd_plot(args: argparse.Namespace) -> None:
    plot([read_json(path) for path in args.results], args.png)
    print(f"wrote {args.png}")


def add_bench_subcommands(bench_subparsers) -> None:
    """Register hf-baseline, serve and plot under `pagedllm bench`."""
    p = bench_subparsers.add_parser(
        "hf-baseline", help="static-batch Hugging Face generate() throughput")
    p.add_argument("--model", help="HF model folder or .gguf file (default: embedded SmolLM2)")
    add_workload_args(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    add_output_args(p)
    p.set_defaults(func=_cmd_hf_baseline)

    p = bench_subparsers.add_parser(
        "serve", help="latency and throughput of an OpenAI-compatible /v1/completions server")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="model name to send (default: the first of /v1/models)")
    add_workload_args(p)
    p.add_argument("--request-rate", type=float, default=math.inf, metavar="R",
                   help="Poisson arrivals of R requests/s; inf sends all at once (default)")
    p.add_argument("--max-concurrency", type=int, metavar="C",
                   help="at most C requests in flight (default: no limit)")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    add_output_args(p)
    p.set_defaults(func=_cmd_serve)

    p = bench_subparsers.add_parser("plot", help="bar chart comparing saved --json results")
    p.add_argument("results", nargs="+", metavar="RESULT.json")
    p.add_argument("--png", required=True, metavar="OUT")
    p.set_defaults(func=_cmd_plot)
