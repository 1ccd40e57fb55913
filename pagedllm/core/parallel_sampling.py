"""Parallel sampling (n > 1): the samples of one prompt share its KV blocks through
the prefix cache, as ordinary requests.

Samples 2..n wait here, outside the scheduler's queue and holding no blocks, until
sample 1 has computed the prompt: its full blocks are cached by then, so when they
are admitted the prefix cache gives them those blocks and they compute only the
prompt's last, partial block. If sample 1 finishes or is aborted first, they are
released to compute on their own. (Preempted, sample 1 recomputes its prompt and
they go on waiting for it.) With prefix caching off nothing can be shared, so the
scheduler queues every sample at once.
"""

from __future__ import annotations

from pagedllm.request import Request


class HeldSamples:
    def __init__(self) -> None:
        # First sample's id -> the samples waiting for it to compute the prompt, in order.
        self._by_first: dict[str, list[Request]] = {}
        # Held sample's id -> its first sample's id.
        self._first_of: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._first_of)

    def __contains__(self, request: Request) -> bool:
        return request.request_id in self._first_of

    def hold(self, first: Request, samples: list[Request]) -> None:
        self._by_first[first.request_id] = list(samples)
        for sample in samples:
            self._first_of[sample.request_id] = first.request_id

    def release(self, first: Request) -> list[Request]:
        """The samples waiting for `first` (none if nothing waits), no longer held."""
        samples = self._by_first.pop(first.request_id, [])
        for sample in samples:
            del self._first_of[sample.request_id]
        return samples

    def remove(self, sample: Request) -> None:
        """Drop a held sample (aborted or stopped while it waited)."""
        first_id = self._first_of.pop(sample.request_id)
        self._by_first[first_id].remove(sample)
