"""The `pagedllm` command: serve, generate, bench, models."""

from __future__ import annotations

import argparse
import logging
import sys

from pagedllm.config import DEFAULT_MODEL_ALIAS
from pagedllm.entrypoints.cli_args import add_engine_args, engine_kwargs


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
