"""Request: one prompt being generated, as the scheduler sees it."""

from __future__ import annotations

import enum
import time

from pagedllm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason for a finished status, None while unfinished."""
        return self.value if self.finished else None


class Request:
    """A prompt plus the tokens generated so far.

    `num_computed_tokens` is the single progress counter: how many of
    `all_token_ids` have K/V in the cache. A step schedules the tokens between it
    and `len(all_token_ids)` (or a chunk of them).

    `cache_salt` keeps the request's blocks apart in the prefix cache: only requests
    with the same salt (or all without one) share cached blocks.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 arrival_time: float | None = None, sample_index: int = 0, cache_salt: str | None = None) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        # Which of the parent's n samples this is; seeds differ per sample.
        self.sample_index = sample_index
        self.cache_salt = cache_salt
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens: int | None = None
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        # Chained hashes of this request's full blocks, in order (see core/block_hash.py).
        self.block_hashes: list[bytes] = []
        self.first_scheduled_time: float | None = None
        # Structured outputs: the request's place in its grammar (a GrammarMatcher of
        # pagedllm.structured_output.grammar), advanced with every sampled token.
        self.grammar = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, "
                f"computed={self.num_computed_tokens}/{self.num_tokens})")
