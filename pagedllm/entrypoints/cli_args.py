"""The engine's command-line flags, shared by `pagedllm serve`, `pagedllm generate` and
`pagedllm bench throughput`: EngineArgs' fields (engine_args.py) plus --log-level.

A module of its own so that the server and the benchmarks take the flags without
importing the `pagedllm` command, which imports them.
"""

from __future__ import annotations

import argparse
import dataclasses

from pagedllm.engine_args import EngineArgs


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The options of `LLM(...)` as flags, the MODEL positional, and --log-level."""
    EngineArgs.add_cli_args(parser)
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The `LLM(...)` keyword arguments given by add_engine_args' flags."""
    return dataclasses.asdict(EngineArgs.from_cli_args(args))
