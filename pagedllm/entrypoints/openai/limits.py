"""What one request may ask of the server: the limits, their defaults and their flags.

They bound the work a single request (or a burst of them) can cause, so that a
hostile or careless client gets a fast 4xx/503 instead of tying up the engine.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pagedllm.sampling_params import MAX_LOGPROBS, MAX_N

DEFAULT_MAX_WAITING_REQUESTS = 1024
# Room for a long context sent as JSON-escaped text, far below what would strain memory.
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20


@dataclass(frozen=True)
class ServerLimits:
    """max_waiting_requests: beyond it, new requests get 503 with Retry-After.
    max_request_bytes: a larger body gets 413 before it is parsed.
    max_prompt_tokens: a longer prompt gets 400 (None: the context length decides).
    max_n / max_logprobs: caps on `n` and on `logprobs` / `top_logprobs`."""

    max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_prompt_tokens: int | None = None
    max_n: int = MAX_N
    max_logprobs: int = MAX_LOGPROBS

    def __post_init__(self) -> None:
        checks = [("--max-waiting-requests", self.max_waiting_requests, 1, None),
                  ("--max-request-bytes", self.max_request_bytes, 1, None),
                  ("--max-prompt-tokens", 1 if self.max_prompt_tokens is None else self.max_prompt_tokens, 1, None),
                  ("--max-n", self.max_n, 1, MAX_N),
                  ("--max-logprobs", self.max_logprobs, 0, MAX_LOGPROBS)]
        for flag, value, low, high in checks:
            if value < low or (high is not None and value > high):
                allowed = f">= {low}" if high is None else f"in [{low}, {high}] (the engine's cap)"
                raise ValueError(f"{flag} must be {allowed}, got {value}")


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("limits")
    group.add_argument("--max-waiting-requests", type=int, default=DEFAULT_MAX_WAITING_REQUESTS,
                       help="answer 503 with Retry-After while this many requests wait to be scheduled "
                            "(default %(default)s)")
    group.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                       help="answer 413 to a larger request body, before parsing it (default %(default)s = 16 MiB)")
    group.add_argument("--max-prompt-tokens", type=int, default=None,
                       help="answer 400 to a longer prompt (default: max_model_len - 1, the context length)")
    group.add_argument("--max-n", type=int, default=MAX_N, help="largest `n` accepted (default %(default)s)")
    group.add_argument("--max-logprobs", type=int, default=MAX_LOGPROBS,
                       help="largest `logprobs` / `top_logprobs` accepted (default %(default)s)")


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(max_waiting_requests=args.max_waiting_requests, max_request_bytes=args.max_request_bytes,
                        max_prompt_tokens=args.max_prompt_tokens, max_n=args.max_n, max_logprobs=args.max_logprobs)
