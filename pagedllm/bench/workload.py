"""Benchmark workloads: the requests a benchmark sends, as token ids.

Workloads are token ids, not text, so every engine under test sees exactly the same
prompt lengths whatever its tokenizer does, and output lengths are fixed because the
benchmarks ignore EOS.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

# Ids below this are special tokens in SmolLM2's vocabulary (<|endoftext|>,
# <|im_start|>, ...); random prompts avoid them so no prompt contains a stop token.
FIRST_NON_SPECIAL_ID = 17


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def num_prompt_tokens(requests: list[BenchRequest]) -> int:
    return sum(r.prompt_len for r in requests)


def num_output_tokens(requests: list[BenchRequest]) -> int:
    return sum(r.output_len for r in requests)


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")


def _parse_request(i: int, entry: object) -> BenchRequest:
    where = f"requests[{i}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is not an object")
    ids = entry.get("prompt_token_ids")
    if not isinstance(ids, list) or not ids:
        raise ValueError(f"{where}.prompt_token_ids must be a non-empty list")
    # bool is an int subclass; true/false in a token list is a malformed file.
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise ValueError(f"{where}.prompt_token_ids must hold non-negative integers")
    output_len = entry.get("output_len")
    if not isinstance(output_len, int) or isinstance(output_len, bool) or output_len < 1:
        raise ValueError(f"{where}.output_len must be a positive integer, got {output_len!r}")
    prompt_len = entry.get("prompt_len")
    if prompt_len is not None and prompt_len != len(ids):
        raise ValueError(
            f"{where}.prompt_len is {prompt_len} but prompt_token_ids has {len(ids)} ids"
        )
    return BenchRequest(prompt_token_ids=ids, output_len=output_len)


def load_workload(path: str | Path, limit: int | None = None) -> list[BenchRequest]:
    """Read a workload file ({"meta": {...}, "requests": [...]}), keeping its order
    (the arrival order); `limit` keeps only the first `limit` requests."""
    _check_limit(limit)
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("requests"), list):
        raise ValueError(f'{path}: expected an object with a "requests" list')
    entries = data["requests"]
    if not entries:
        raise ValueError(f"{path}: the workload has no requests")
    if limit is not None:
        entries = entries[:limit]
    try:
        return [_parse_request(i, e) for i, e in enumerate(entries)]
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def random_workload(
    num_prompts: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0
) -> list[BenchRequest]:
    """`num_prompts` requests of exactly `input_len` prompt tokens drawn uniformly from
    [FIRST_NON_SPECIAL_ID, vocab_size), each generating `output_len` tokens."""
    if num_prompts < 1 or input_len < 1 or output_len < 1:
        raise ValueError(
            "num_prompts, input_len and output_len must be >= 1, got "
            f"{num_prompts}, {input_len}, {output_len}"
        )
    if vocab_size <= FIRST_NON_SPECIAL_ID:
        raise ValueError(f"vocab_size must be > {FIRST_NON_SPECIAL_ID}, got {vocab_size}")
    rng = random.Random(seed)
    return [
        BenchRequest(
            [rng.randrange(FIRST_NON_SPECIAL_ID, vocab_size) for _ in range(input_len)],
            output_len,
        )
        for _ in range(num_prompts)
    ]


def throughput_rates(num_requests: int, prompt_tokens: int, output_tokens: int, elapsed: float) -> dict:
    """The rates every benchmark reports, computed one way."""
    return {"elapsed_s": elapsed, "requests_per_s": num_requests / elapsed,
            "output_tokens_per_s": output_tokens / elapsed,
            "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed}
