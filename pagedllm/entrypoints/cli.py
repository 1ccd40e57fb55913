"""The `pagedllm` command: serve, generate, bench, models."""

from __future__ import annotations

import argparse
import logging
import sys

from pagedllm.config import DEFAULT_MODEL_ALIAS, DTYPES, KV_CACHE_DTYPES


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The options of `LLM(...)` as flags (shared by serve, generate and bench)."""
    parser.add_argument("model", nargs="?", default=None,
                        help=f"Hugging Face model folder, .gguf file or alias (default: {DEFAULT_MODEL_ALIAS})")
    group = parser.add_argument_group("engine")
    group.add_argument("--dtype", default="auto", choices=DTYPES,
                       help="weights/activations dtype; auto = checkpoint dtype, 16-bit runs as bfloat16 on "
                            "CUDA and on CPUs with native bfloat16, else float32")
    group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    group.add_argument("--max-model-len", type=int, default=None,
                       help="longest prompt + completion in tokens (default: the model's context length)")
    group.add_argument("--kv-cache-memory", default=None,
                       help="KV pool size in GiB (e.g. 4 or 0.5) or with a unit ('512MiB'); "
                            "default min(4 GiB, 25%% of available memory) on CPU, 90%% of free memory on CUDA")
    group.add_argument("--num-kv-blocks", type=int, default=None, help="exact KV pool size in blocks (overrides)")
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    group.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                       help="how K/V are stored; auto = the model's dtype. float16 with a float32 model "
                            "halves KV memory (twice the tokens fit) and the bytes decode attention reads")
    group.add_argument("--max-num-seqs", type=int, default=256, help="most requests in one step")
    group.add_argument("--max-num-batched-tokens", type=int, default=None,
                       help="token budget of one step (default 2048 on CPU, 8192 on CUDA)")
    group.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                       help="turn off prefix caching")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("-tp", "--tensor-parallel-size", type=int, default=1,
                       help="split the model across this many worker processes (one rank each)")
    group.add_argument("--distributed-executor-backend", default="mp", choices=("mp", "ray"),
                       help="how the ranks run with -tp > 1: local processes (mp) or Ray actors, "
                            "possibly on several machines (ray; needs pip install pagedllm[ray])")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(model=args.model, dtype=args.dtype, device=args.device, seed=args.seed,
                max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory,
                num_kv_blocks=args.num_kv_blocks, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                enable_prefix_caching=args.enable_prefix_caching, kv_cache_dtype=args.kv_cache_dtype,
                tensor_parallel_size=args.tensor_parallel_size,
                distributed_executor_backend=args.distributed_executor_backend)


def _generate(args: argparse.Namespace) -> int:
    from pagedllm import LLM, SamplingParams

    llm = LLM(**engine_kwargs(args))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            seed=args.sample_seed, n=args.n)
    if args.chat:
        outputs = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
    else:
        outputs = llm.generate(args.prompt, params, use_tqdm=False)
    for completion in outputs[0].outputs:
        print(completion.text)
    return 0


def _models(args: argparse.Namespace) -> int:
    from pagedllm.models.registry import supported_architectures

    print("Supported architectures (config.json 'architectures'):")
    for name in supported_architectures():
        print(f"  {name}")
    print(f"Formats: Hugging Face folders (*.safetensors, pytorch_model*.bin), .gguf files. "
          f"Default model alias: {DEFAULT_MODEL_ALIAS}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedllm", description="High-throughput LLM inference and serving.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate a completion for one prompt")
    add_engine_args(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat", action="store_true", help="apply the model's chat template")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--n", type=int, default=1)
    generate.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    generate.set_defaults(func=_generate)

    models = commands.add_parser("models", help="list supported model architectures")
    models.set_defaults(func=_models)

    from pagedllm.entrypoints.openai.server import add_serve_parser

    add_serve_parser(commands)

    from pagedllm.bench.cli import add_bench_subcommands
    from pagedllm.bench.throughput import add_throughput_parser

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    add_throughput_parser(bench)
    add_bench_subcommands(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "info").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
