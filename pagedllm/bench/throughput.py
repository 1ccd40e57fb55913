"""`pagedllm bench throughput`: the offline engine on a whole workload at once.

All requests are submitted together (ignore_eos, max_tokens = each request's
output length); reports requests/s, total and output tokens/s, start-up time,
peak RSS and KV-cache waste (share of allocated KV slots holding no token,
sampled after every step).

`--structured-share F` gives a share F of the requests, evenly spread, a JSON-schema
constraint, to measure what structured outputs cost. A constrained request ends when
its grammar completes, so token counts and rates are those actually generated, and the
mean output length of constrained and unconstrained requests is reported apart.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
from pathlib import Path

import psutil

from pagedllm.bench.cli import add_output_args, add_run_info, add_workload_args, finish_report, load_requests
from pagedllm.bench.workload import BenchRequest, num_output_tokens, num_prompt_tokens, throughput_rates
from pagedllm.entrypoints.cli_args import add_engine_args, engine_kwargs


# Realistic JSON (an object of a few properties) that still lets the model write for as
# long as an unconstrained request: the grammar cannot complete before 128 non-empty
# keywords (a word and '","' at least: ~2 tokens each), so outputs of up to 256 tokens
# (workload W's longest) run to their max_tokens. Unbounded strings alone do not do
# that: the embedded model closes them after a word or two ({"title":"Mali","tags":[],
# "summary":"Mali"}), and an unbounded integer makes it write 1111... forever.
DEFAULT_STRUCTURED_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "language": {"enum": ["en", "fr", "de", "es"]},
        "keywords": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 128},
    },
    "required": ["title", "language", "keywords"],
    "additionalProperties": False,
}


def structured_indices(num_requests: int, share: float) -> set[int]:
    """round(share * num_requests) request indices, evenly spread: request i is
    constrained when the rounded running count of constrained requests steps up at i."""
    if not 0 <= share <= 1:
        raise ValueError(f"the structured share must be in [0, 1], got {share}")
    return {i for i in range(num_requests) if math.floor((i + 1) * share + 0.5) > math.floor(i * share + 0.5)}


def _mean(values: list[int]) -> float | None:
    return sum(values) / len(values) if values else None


def run_throughput(requests: list[BenchRequest], structured_share: float = 0.0,
                   structured_schema: dict | None = None, **engine_kwargs) -> dict:
    """structured_share: the share of requests constrained to structured_schema (default
    DEFAULT_STRUCTURED_SCHEMA); ValueError if the share is out of range or the schema invalid."""
    from pagedllm import SamplingParams
    from pagedllm.engine.llm_engine import LLMEngine
    from pagedllm.sampling_params import StructuredOutputsParams

    constrained = structured_indices(len(requests), structured_share)
    schema = DEFAULT_STRUCTURED_SCHEMA if structured_schema is None else structured_schema
    process_start = psutil.Process().create_time()
    started = time.time()
    engine = LLMEngine.from_args(**engine_kwargs)
    ready = time.time()
    for i, request in enumerate(requests):
        spec = StructuredOutputsParams(json=schema) if i in constrained else None
        params = SamplingParams(temperature=0, max_tokens=request.output_len, ignore_eos=True,
                                structured_outputs=spec)
        # Streamed outputs: every step reports progress, so the first token is seen when it comes.
        engine.add_tokenized_request(str(i), None, request.prompt_token_ids, params, stream=True)
    unfilled = used = 0
    first_token_time = None
    num_steps = 0
    generated = [0] * len(requests)
    while engine.has_unfinished_requests():
        outputs = engine.step()
        num_steps += 1
        if first_token_time is None and outputs:
            first_token_time = time.time()
        for output in outputs:
            generated[int(output.request_id)] = output.num_generated_tokens
        stats = engine.engine_core.stats()
        unfilled += stats.num_unfilled_slots
        used += stats.num_used_slots
    elapsed = time.time() - ready
    prompt_tokens, output_tokens = num_prompt_tokens(requests), sum(generated)
    dtype, kv_dtype = engine.config.model.dtype, engine.config.cache.kv_dtype(engine.config.model.dtype)
    quantization = engine.config.model.quantization
    label = (f"pagedllm {dtype}" + (f", KV {kv_dtype}" if kv_dtype != dtype else "")
             + (f", {quantization} quantized" if quantization else ""))
    return {
        "label": label + (f", structured {structured_share:g}" if constrained else ""), "backend": "pagedllm",
        "model": engine.config.model.path, "dtype": dtype, "kv_cache_dtype": kv_dtype, "quantization": quantization,
        "device": engine.config.model.device, "num_requests": len(requests),
        "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "requested_output_tokens": num_output_tokens(requests), "num_steps": num_steps,
        "structured_share": structured_share, "num_structured_requests": len(constrained),
        "structured_schema": schema if constrained else None,
        "mean_output_len_structured": _mean([n for i, n in enumerate(generated) if i in constrained]),
        "mean_output_len_unstructured": _mean([n for i, n in enumerate(generated) if i not in constrained]),
        **throughput_rates(len(requests), prompt_tokens, output_tokens, elapsed),
        "engine_init_s": ready - started,
        "startup_to_first_token_s": (first_token_time or ready) - process_start,
        "kv_cache_waste": unfilled / used if used else 0.0,
        "kv_cache_blocks": engine.engine_core.num_blocks,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def load_schema(text: str) -> dict:
    """--structured-schema: inline JSON, or the path of a file holding it; ValueError if neither."""
    source = "--structured-schema"
    if not text.lstrip().startswith("{"):
        if not os.path.isfile(text):
            raise ValueError(f"--structured-schema is neither a JSON object nor a file: {text!r}")
        source, text = text, Path(text).read_text(encoding="utf-8")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{source}: a JSON schema is an object, got {type(schema).__name__}")
    return schema


def _structured_args(args: argparse.Namespace) -> dict:
    if args.structured_schema is not None and args.structured_share == 0:
        raise ValueError("--structured-schema needs --structured-share > 0")
    schema = None if args.structured_schema is None else load_schema(args.structured_schema)
    return {"structured_share": args.structured_share, "structured_schema": schema}


def _cmd_throughput(args: argparse.Namespace) -> None:
    requests = load_requests(args)
    try:
        result = run_throughput(requests, **_structured_args(args), **engine_kwargs(args))
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from e
    add_run_info(args, result)
    finish_report(args, result, "pagedllm offline throughput", [
        ("Model / dtype / KV dtype / quantization",
         f"{result['model'].rsplit('/', 1)[-1]} / {result['dtype']} / {result['kv_cache_dtype']} / "
         f"{result['quantization'] or 'none'}"),
        ("Requests", result["num_requests"]), ("Prompt tokens", result["prompt_tokens"]),
        ("Structured share (requests)",
         f"{result['structured_share']:g} ({result['num_structured_requests']})"),
        ("Output tokens", result["output_tokens"]),
        ("Requested output tokens", result["requested_output_tokens"]),
        ("Mean output len, structured", result["mean_output_len_structured"]),
        ("Mean output len, unstructured", result["mean_output_len_unstructured"]),
        ("Steps", result["num_steps"]),
        ("Elapsed (s)", result["elapsed_s"]), ("Requests/s", result["requests_per_s"]),
        ("Output tok/s", result["output_tokens_per_s"]), ("Total tok/s", result["total_tokens_per_s"]),
        ("Engine init (s)", result["engine_init_s"]),
        ("Process start -> first token (s)", result["startup_to_first_token_s"]),
        ("KV-cache waste (%)", 100 * result["kv_cache_waste"]),
        ("Peak RSS (GiB)", result["peak_rss_gib"]),
        ("CPU / threads", f"{result['cpu']} / {result['cpu_threads']}"),
    ])


def add_throughput_parser(bench_subparsers) -> None:
    # One --seed serves both the engine and the random workload.
    parser = bench_subparsers.add_parser("throughput", help="offline engine throughput on a workload",
                                         conflict_handler="resolve")
    add_engine_args(parser)
    add_workload_args(parser)
    g = parser.add_argument_group("structured outputs")
    g.add_argument("--structured-share", type=float, default=0.0, metavar="F",
                   help="constrain this share (0..1) of the requests, evenly spread, to a JSON schema "
                        "(default %(default)s)")
    g.add_argument("--structured-schema", metavar="JSON|FILE",
                   help="the JSON schema, inline or in a file (default: an object of a title, a language and "
                        ">= 128 keywords, which runs as long as an unconstrained request)")
    add_output_args(parser)
    parser.set_defaults(func=_cmd_throughput)
