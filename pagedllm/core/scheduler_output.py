"""Plain data that crosses the scheduler / worker boundary once per step.

Everything here is picklable (lists, ints, dataclasses) so the same objects go
to worker processes and Ray actors unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagedllm.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the workers have not seen (new, or resumed after preemption)."""

    request_id: str
    token_ids: list[int]  # prompt + output so far
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    sampling_params: SamplingParams
    sample_index: int


@dataclass
class CachedRequestData:
    """A delta for a request the workers already hold."""

    request_id: str
    new_token_ids: list[int]  # tokens sampled since the workers last saw it
    block_table_start: int  # block table entries from here on are replaced by new_block_ids
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class GrammarBitmask:
    """The next-token masks of this step's constrained requests that sample: row i of
    `bitmask` (numpy int32 [len(request_ids), ceil(vocab / 32)]) belongs to request_ids[i]."""

    request_ids: list[str]
    bitmask: Any


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    # request id -> tokens computed this step, in batch order.
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    # Requests the workers must forget (finished, aborted or preempted).
    freed_request_ids: list[str] = field(default_factory=list)
    # Filled by the engine core when requests with a grammar sample this step.
    grammar_bitmask: GrammarBitmask | None = None

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


@dataclass
class TokenLogprobs:
    """Log-probabilities at one position: the chosen token first, then the top-N.
    ranks[i] is 1 for the most likely token."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]


@dataclass
class ModelRunnerOutput:
    """What rank 0 returns: a token for each request whose scheduled tokens
    reached the end of its known tokens (a partial prompt chunk samples nothing)."""

    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # request id -> (first prompt position covered, logprobs of the prompt positions
    # predicted this step; None for position 0, which has no prediction).
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs | None]]] = field(default_factory=dict)


@dataclass
class EngineCoreOutput:
    """One request's progress in one step, for the output processor."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    new_prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    prompt_logprobs_start: int = 0  # prompt position of new_prompt_logprobs[0]
    num_cached_tokens: int = 0
