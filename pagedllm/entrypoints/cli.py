"""The `pagedllm` command: serve, generate, bench, models.

A plain `pip install pagedllm` must run every command but `bench`: the benchmarks,
and the packages of the bench extra they import, are imported only when a bench
command line is parsed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from pagedllm.config import DEFAULT_MODEL_ALIAS
from pagedllm.entrypoints.cli_args import add_engine_args, engine_kwargs

# Optional packages, by import name -> (the extra that installs them, what needs them).
OPTIONAL_PACKAGES = {**{name: ("bench", "the benchmarks") for name in ("openai", "httpx", "matplotlib", "accelerate")},
                     "ray": ("ray", "Ray executors")}


class _CommandParser(argparse.ArgumentParser):
    """A command's parser that can get its arguments only when argparse reaches it
    (`add_arguments`), so that what they import is imported for that command alone."""

    def __init__(self, *args, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._add_arguments = add_arguments

    def parse_known_args(self, args=None, namespace=None):
        if self._add_arguments is not None:
            add_arguments, self._add_arguments = self._add_arguments, None
            add_arguments(self)
        return super().parse_known_args(args, namespace)


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


def _add_bench_commands(bench: argparse.ArgumentParser) -> None:
    from pagedllm.bench.cli import add_bench_subcommands
    from pagedllm.bench.throughput import add_throughput_parser

    commands = bench.add_subparsers(dest="bench_command", required=True)
    add_throughput_parser(commands)
    add_bench_subcommands(commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedllm", description="High-throughput LLM inference and serving.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)

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

    commands.add_parser("bench", help="benchmarks", add_arguments=_add_bench_commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=getattr(args, "log_level", "info").upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return args.func(args) or 0
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        package = (error.name or "").partition(".")[0]
        if package not in OPTIONAL_PACKAGES:
            raise
        # Only optional features import these: a one-line hint, not a traceback.
        extra, user = OPTIONAL_PACKAGES[package]
        print(f"error: {package} is not installed, and {user} need it: pip install 'pagedllm[{extra}]'",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
