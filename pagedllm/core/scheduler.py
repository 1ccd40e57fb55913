"""Continuous batching over a token budget.

One rule for every request: a step advances `num_computed_tokens` toward
`num_tokens`. A new prompt, a chunk of a long prompt, a resumed preempted
request and a decode token differ only in how many tokens are scheduled.
Running requests go first (in admission order), then waiting ones (FCFS).
When the pool is full the most recently admitted running request is preempted
(its blocks freed, recomputed later); nothing is ever dropped.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass

from pagedllm.core.kv_cache_manager import Allocation, KVCacheManager
from pagedllm.core.parallel_sampling import HeldSamples
from pagedllm.core.scheduler_output import (CachedRequestData, EngineCoreOutput, ModelRunnerOutput,
                                            NewRequestData, SchedulerOutput)
from pagedllm.core.stopping import check_stop
from pagedllm.request import Request, RequestStatus


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions_total: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    num_unfilled_slots: int
    num_used_slots: int


def combined_stats(replica_stats: list[SchedulerStats]) -> SchedulerStats:
    """The replicas' stats as one engine's: counts and totals add up, KV usage is the mean."""
    total = {field.name: sum(getattr(stats, field.name) for stats in replica_stats)
             for field in dataclasses.fields(SchedulerStats)}
    total["kv_cache_usage"] /= len(replica_stats)
    return SchedulerStats(**total)


class Scheduler:
    def __init__(self, kv_cache_manager: KVCacheManager, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int) -> None:
        self.kv = kv_cache_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Samples 2..n of a prompt, waiting for sample 1 to compute it (parallel_sampling.py).
        self.held_samples = HeldSamples()
        # How many of each request's tokens the workers have been sent.
        self._num_tokens_sent: dict[str, int] = {}
        self._freed_request_ids: list[str] = []
        self.num_preemptions_total = 0

    # ---- requests in and out -------------------------------------------------

    def add_request(self, request: Request, samples: list[Request] = ()) -> None:
        """Queue a request; `samples`: the other samples of its prompt (n > 1), which
        share its prompt's blocks through the prefix cache once it has computed them."""
        for queued in (request, *samples):
            self.requests[queued.request_id] = queued
        self.waiting.append(request)
        if samples and self.kv.enable_prefix_caching:
            self.held_samples.hold(request, list(samples))
        else:
            self.waiting.extend(samples)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        """Finish requests from outside the step (abort, stop string)."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.status.finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            elif request in self.held_samples:
                self.held_samples.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self._release_samples(request)  # samples still waiting on one that ends early run on their own
        self.kv.free(request)
        del self.requests[request.request_id]
        if self._num_tokens_sent.pop(request.request_id, None) is not None:
            self._freed_request_ids.append(request.request_id)

    def _release_samples(self, first: Request) -> None:
        """The samples held for `first` join the front of the queue, in order."""
        self.waiting.extendleft(reversed(self.held_samples.release(first)))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- one step --------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput(freed_request_ids=self._freed_request_ids)
        self._freed_request_ids = []
        token_budget = self.max_num_batched_tokens
        scheduled_running: list[Request] = []
        preempted = False

        index = 0
        while index < len(self.running) and token_budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, token_budget)
            allocation = self.kv.allocate_slots(request, num_new)
            while allocation is None:
                victim = self.running.pop()
                self._preempt(victim, output)
                preempted = True
                if victim is request:
                    break
                allocation = self.kv.allocate_slots(request, num_new)
            if allocation is None:
                break
            self._record(output, request, num_new, allocation, is_new=False)
            token_budget -= num_new
            scheduled_running.append(request)
            index += 1

        while (self.waiting and token_budget > 0 and not preempted
               and len(self.running) < self.max_num_seqs):
            request = self.waiting[0]  # it holds no blocks (a preempted request gave them back)
            hits = self.kv.get_computed_blocks(request)
            num_computed = len(hits) * self.kv.block_size
            num_new = min(request.num_tokens - num_computed, token_budget)
            allocation = self.kv.allocate_slots(request, num_new, hits)
            if allocation is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_computed
            if request.num_cached_tokens is None:
                request.num_cached_tokens = num_computed
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            self._record(output, request, num_new, allocation, is_new=True)
            token_budget -= num_new
        return output

    def _preempt(self, request: Request, output: SchedulerOutput) -> None:
        """Free the request's blocks; it is recomputed later from the front of the queue."""
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        if self._num_tokens_sent.pop(request.request_id, None) is not None:
            output.freed_request_ids.append(request.request_id)
        self.waiting.appendleft(request)

    def _record(self, output: SchedulerOutput, request: Request, num_new: int,
                allocation: Allocation, is_new: bool) -> None:
        request_id = request.request_id
        output.num_scheduled_tokens[request_id] = num_new
        if is_new:
            output.new_requests.append(NewRequestData(
                request_id=request_id, token_ids=list(request.all_token_ids),
                num_prompt_tokens=request.num_prompt_tokens, block_ids=self.kv.block_ids(request_id),
                num_computed_tokens=request.num_computed_tokens,
                sampling_params=request.sampling_params, sample_index=request.sample_index))
        else:
            num_sent = self._num_tokens_sent[request_id]
            output.cached_requests.append(CachedRequestData(
                request_id=request_id, new_token_ids=request.all_token_ids[num_sent:],
                block_table_start=allocation.first_changed_index, new_block_ids=allocation.block_ids,
                num_computed_tokens=request.num_computed_tokens))
        self._num_tokens_sent[request_id] = request.num_tokens

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Advance progress, append sampled tokens, apply stop conditions."""
        outputs = []
        for request_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            request = self.requests.get(request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            request.num_computed_tokens += num_scheduled
            prompt_start, prompt_logprobs = runner_output.prompt_logprobs.get(request_id, (0, []))
            token_id = runner_output.sampled_token_ids.get(request_id)
            if token_id is None:
                self.kv.cache_full_blocks(request)
                self.kv.release_out_of_window_blocks(request)
                if prompt_logprobs:
                    outputs.append(EngineCoreOutput(request_id, [], new_prompt_logprobs=prompt_logprobs,
                                                    prompt_logprobs_start=prompt_start,
                                                    num_cached_tokens=request.num_cached_tokens or 0))
                continue
            request.append_output_token(token_id)
            if request.grammar is not None:
                request.grammar.accept_token(token_id)
            self.kv.cache_full_blocks(request)
            if request.num_output_tokens == 1:  # its prompt is computed and its full blocks cached
                self._release_samples(request)
            self.kv.release_out_of_window_blocks(request)
            status = check_stop(request, self.max_model_len)
            logprobs = runner_output.logprobs.get(request_id)
            outputs.append(EngineCoreOutput(
                request_id, [token_id], finish_reason=status.finish_reason if status else None,
                stop_reason=request.stop_reason, new_logprobs=[logprobs] if logprobs else [],
                new_prompt_logprobs=prompt_logprobs, prompt_logprobs_start=prompt_start,
                num_cached_tokens=request.num_cached_tokens or 0))
            if status is not None:
                self.running.remove(request)
                self._finish(request, status)
        return outputs

    def stats(self) -> SchedulerStats:
        unfilled = self.kv.num_unfilled_slots(self.running)
        used_slots = (self.kv.pool.num_blocks - self.kv.num_free_blocks) * self.kv.block_size
        return SchedulerStats(
            num_running=len(self.running), num_waiting=len(self.waiting) + len(self.held_samples),
            kv_cache_usage=self.kv.usage, num_preemptions_total=self.num_preemptions_total,
            prefix_cache_queried_tokens=self.kv.prefix_cache_stats.num_queried_tokens,
            prefix_cache_hit_tokens=self.kv.prefix_cache_stats.num_hit_tokens,
            num_unfilled_slots=unfilled, num_used_slots=used_slots)
