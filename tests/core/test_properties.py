"""Property test: random adds (shared prefixes, n > 1, prompt logprobs), steps and
aborts (also in the middle of a step) on the smallest pools the engine allows, with
and without prefix caching and sliding windows, over any token budget and batch size.

After every step: ref counts are >= 0 and equal the references requests hold, the free
queue holds exactly the blocks with ref 0, the workers' copy (rebuilt from deltas)
matches the scheduler, only blocks with ref 1 are written, and every request reads
its own K/V (the fake runner simulates the pool's contents). At the end every block
is free, every request finished or was aborted, and every finished request's tokens
equal those of a run on a huge pool (outputs never depend on preemption, chunking or
the prefix cache)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pagedllm.core.kv_cache_manager import cdiv
from pagedllm.request import RequestStatus
from tests.core.helpers import (FakeRunner, add_requests, check_kv, check_worker_view, make_request,
                                make_scheduler, make_siblings)

MAX_MODEL_LEN = 24
VOCAB = 40  # EOS (2) is sampled now and then
PREFIXES = [[7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [20, 21, 22, 23, 24, 25], [7, 8, 9, 10, 30, 31, 32]]

request_specs = st.fixed_dictionaries({
    "prefix": st.sampled_from(range(len(PREFIXES))),
    "prefix_len": st.integers(0, 10),
    "suffix": st.lists(st.integers(3, VOCAB - 1), max_size=8),
    "n": st.sampled_from([1, 1, 1, 2, 4]),
    "max_tokens": st.integers(1, 10),
    "min_tokens": st.integers(0, 2),
    "ignore_eos": st.booleans(),
    "stop_token_ids": st.sampled_from([[], [], [5], [5, 6]]),
    "prompt_logprobs": st.sampled_from([None, None, None, None, 1]),
})


def build_requests(request_id: str, spec: dict):
    prompt = (PREFIXES[spec["prefix"]][:spec["prefix_len"]] + spec["suffix"]) or [3]
    params = dict(max_tokens=spec["max_tokens"], min_tokens=min(spec["min_tokens"], spec["max_tokens"]),
                  ignore_eos=spec["ignore_eos"], stop_token_ids=spec["stop_token_ids"],
                  prompt_logprobs=spec["prompt_logprobs"])
    if spec["n"] == 1:
        return [make_request(request_id, prompt, **params)]
    return make_siblings(request_id, prompt, spec["n"], **params)


def run_all(scheduler, runner, streamed, check=True, max_steps_without_a_token=100):
    """Step until every request is done. Budget >= 1 and no request is longer than
    MAX_MODEL_LEN, so the oldest running request samples a token at least every
    MAX_MODEL_LEN steps; a much longer wait without any token is a livelock."""
    steps_without_a_token = 0
    while scheduler.has_unfinished_requests():
        output = scheduler.schedule()
        runner_output = runner.execute(output)
        if check:
            check_worker_view(scheduler, output, runner)
        for out in scheduler.update_from_output(output, runner_output):
            streamed.setdefault(out.request_id, []).extend(out.new_token_ids)
        if check:
            check_kv(scheduler.kv)
        steps_without_a_token = 0 if runner_output.sampled_token_ids else steps_without_a_token + 1
        assert steps_without_a_token < max_steps_without_a_token, (
            f"livelock: no token in {max_steps_without_a_token} steps; running {scheduler.running}, "
            f"waiting {list(scheduler.waiting)}, blocks {scheduler.kv.requests}")


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(block_size=st.sampled_from([1, 2, 4]), extra_blocks=st.integers(0, 3),
                budget=st.integers(1, 24), max_num_seqs=st.integers(1, 5), caching=st.booleans(),
                sliding_window=st.sampled_from([None, None, None, 2, 3, 5, 8]))
    def setup(self, block_size, extra_blocks, budget, max_num_seqs, caching, sliding_window):
        # The smallest pool the engine allows: one request of max_model_len, plus a few.
        self.num_blocks = cdiv(MAX_MODEL_LEN, block_size) + extra_blocks
        self.block_size = block_size
        self.scheduler = make_scheduler(self.num_blocks, block_size, max_num_seqs=max_num_seqs,
                                        max_num_batched_tokens=budget, max_model_len=MAX_MODEL_LEN,
                                        enable_prefix_caching=caching, sliding_window=sliding_window)
        self.runner = FakeRunner(block_size, vocab_size=VOCAB, sliding_window=sliding_window)
        self.specs: list[tuple[str, dict]] = []
        self.requests = {}
        self.aborted: set[str] = set()
        self.streamed: dict[str, list[int]] = {}

    # ---- rules ---------------------------------------------------------------

    @rule(spec=request_specs)
    def add(self, spec):
        request_id = f"r{len(self.specs)}"
        self.specs.append((request_id, spec))
        requests = build_requests(request_id, spec)
        for request in requests:
            self.requests[request.request_id] = request
        add_requests(self.scheduler, requests)

    def _step(self, abort_choice=None):
        output = self.scheduler.schedule()
        runner_output = self.runner.execute(output)
        check_worker_view(self.scheduler, output, self.runner)
        if abort_choice is not None and output.num_scheduled_tokens:
            scheduled = list(output.num_scheduled_tokens)
            self._abort(scheduled[abort_choice % len(scheduled)])
        for out in self.scheduler.update_from_output(output, runner_output):
            assert out.request_id not in self.aborted
            self.streamed.setdefault(out.request_id, []).extend(out.new_token_ids)

    @rule(count=st.integers(1, 4))
    def step(self, count):
        for _ in range(count):
            self._step()

    @rule(choice=st.integers(0, 100))
    def abort_during_step(self, choice):
        self._step(abort_choice=choice)

    def _abort(self, request_id):
        self.aborted.add(request_id)
        self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_ABORTED)
        assert self.requests[request_id].status == RequestStatus.FINISHED_ABORTED

    @precondition(lambda self: self.scheduler.has_unfinished_requests())
    @rule(choice=st.integers(0, 100))
    def abort(self, choice):
        live = list(self.scheduler.requests)
        self._abort(live[choice % len(live)])

    # ---- invariants -------------------------------------------------------------

    @invariant()
    def books_balance(self):
        scheduler, kv = self.scheduler, self.scheduler.kv
        check_kv(kv)  # ref counts >= 0, = holders, free queue = blocks with ref 0
        assert set(kv.requests) <= set(scheduler.requests)  # finished requests hold nothing
        held = [r for r in scheduler.requests.values() if r in scheduler.held_samples]
        assert not any(r.request_id in kv.requests for r in held)  # a held sample holds no blocks
        queued = [r.request_id for r in [*scheduler.running, *scheduler.waiting, *held]]
        assert sorted(queued) == sorted(scheduler.requests)  # each live request in exactly one place
        for request in scheduler.running:
            assert request.status == RequestStatus.RUNNING
            assert request.num_computed_tokens < request.num_tokens
            assert len(kv.block_ids(request.request_id)) >= cdiv(request.num_computed_tokens, self.block_size)
        for request in scheduler.waiting:
            assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        for request in self.requests.values():
            assert request.num_tokens <= MAX_MODEL_LEN
            if request.status.finished:
                assert request.request_id not in scheduler.requests

    # ---- the end ------------------------------------------------------------------

    def teardown(self):
        if not hasattr(self, "scheduler"):
            return
        scheduler = self.scheduler
        run_all(scheduler, self.runner, self.streamed)
        # Nothing leaks: every block free, the workers told to forget every request.
        assert scheduler.kv.num_free_blocks == self.num_blocks
        assert scheduler.kv.requests == {}
        final = scheduler.schedule()
        assert final.is_empty
        self.runner.execute(final)
        assert self.runner.states == {}
        check_kv(scheduler.kv)
        for request in self.requests.values():
            assert request.status.finished
            assert (request.status == RequestStatus.FINISHED_ABORTED) == (request.request_id in self.aborted)

        # Outputs never depend on the pool, budget, preemption or prefix cache: replay
        # every request at once, unchunked, on a pool that holds them all at full length.
        reference_requests = {}
        for request_id, spec in self.specs:
            for request in build_requests(request_id, spec):
                reference_requests[request.request_id] = request
        num_blocks = cdiv(MAX_MODEL_LEN, self.block_size) * max(1, len(reference_requests))
        reference = make_scheduler(num_blocks, self.block_size, max_num_seqs=1000,
                                   max_num_batched_tokens=100_000, max_model_len=MAX_MODEL_LEN,
                                   enable_prefix_caching=False)
        add_requests(reference, list(reference_requests.values()))
        run_all(reference, FakeRunner(self.block_size, vocab_size=VOCAB), {}, check=False)
        assert reference.num_preemptions_total == 0
        for request_id, request in self.requests.items():
            if request_id in self.aborted:
                continue
            expected = reference_requests[request_id]
            assert request.output_token_ids == expected.output_token_ids, request_id
            assert (request.status, request.stop_reason) == (expected.status, expected.stop_reason)
            assert self.streamed[request_id] == request.output_token_ids


SchedulerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=20, deadline=None,
                                              suppress_health_check=[HealthCheck.too_slow])
TestScheduler = SchedulerMachine.TestCase
