"""Scheduler driven directly with plain-data fake model outputs."""

from __future__ import annotations

import pytest

from pagedllm.core.scheduler_output import CachedRequestData, ModelRunnerOutput, NewRequestData
from pagedllm.core.stopping import check_stop
from pagedllm.request import RequestStatus
from tests.core.helpers import (EOS, FakeRunner, add_requests, check_kv, fake_token, make_request,
                                make_scheduler, make_siblings, step)

BS = 4


def scripted(scripts: dict[str, list[int]], default: int = 7):
    """token_fn: request `rid` samples scripts[rid][k] as its k-th output token.
    Fails if any output position is sampled twice."""
    seen = set()

    def token_fn(request_id, state):
        index = len(state.token_ids) - state.num_prompt_tokens
        assert (request_id, index) not in seen, f"{request_id} sampled output {index} twice"
        seen.add((request_id, index))
        script = scripts.get(request_id, [])
        return script[index] if index < len(script) else default

    return token_fn


def run_to_end(scheduler, runner, max_steps=200):
    """Step until nothing is unfinished; returns every request's streamed tokens and finish reason."""
    streamed: dict[str, list[int]] = {}
    finish: dict[str, str] = {}
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            break
        _, _, outputs = step(scheduler, runner)
        check_kv(scheduler.kv)
        for out in outputs:
            streamed.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finish_reason is not None:
                finish[out.request_id] = out.finish_reason
    assert not scheduler.has_unfinished_requests()
    return streamed, finish


# ---- budget and order ---------------------------------------------------------


def test_token_budget_chunks_the_second_prompt_and_keeps_the_third_waiting():
    scheduler = make_scheduler(32, BS, max_num_batched_tokens=10)
    runner = FakeRunner(BS)
    for rid, n in (("a", 6), ("b", 6), ("c", 3)):
        scheduler.add_request(make_request(rid, [1] * n, max_tokens=5, ignore_eos=True))
    output, runner_output, _ = step(scheduler, runner)
    assert output.num_scheduled_tokens == {"a": 6, "b": 4}
    assert list(runner_output.sampled_token_ids) == ["a"]  # b's chunk samples nothing
    assert [r.request_id for r in scheduler.waiting] == ["c"]
    output, runner_output, _ = step(scheduler, runner)
    # running first (admission order), then the waiting one
    assert list(output.num_scheduled_tokens.items()) == [("a", 1), ("b", 2), ("c", 3)]
    assert sorted(runner_output.sampled_token_ids) == ["a", "b", "c"]
    assert [r.request_id for r in scheduler.running] == ["a", "b", "c"]


def test_budget_exhausted_by_running_requests_admits_nothing():
    scheduler = make_scheduler(32, BS, max_num_batched_tokens=2)
    runner = FakeRunner(BS)
    scheduler.add_request(make_request("a", [1], max_tokens=5, ignore_eos=True))
    scheduler.add_request(make_request("b", [1], max_tokens=5, ignore_eos=True))
    scheduler.add_request(make_request("c", [1], max_tokens=5, ignore_eos=True))
    assert step(scheduler, runner)[0].num_scheduled_tokens == {"a": 1, "b": 1}
    assert step(scheduler, runner)[0].num_scheduled_tokens == {"a": 1, "b": 1}
    assert [r.request_id for r in scheduler.waiting] == ["c"]


def test_max_num_seqs_caps_the_batch_and_fcfs_fills_a_freed_seat():
    scheduler = make_scheduler(32, BS, max_num_seqs=2)
    runner = FakeRunner(BS)
    scheduler.add_request(make_request("a", [1, 2], max_tokens=1, ignore_eos=True))
    scheduler.add_request(make_request("b", [1, 2], max_tokens=3, ignore_eos=True))
    scheduler.add_request(make_request("c", [3], max_tokens=3, ignore_eos=True))
    scheduler.add_request(make_request("d", [4], max_tokens=3, ignore_eos=True))
    output, _, outputs = step(scheduler, runner)
    assert output.num_scheduled_tokens == {"a": 2, "b": 2}
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("a", "length"), ("b", None)]
    output, _, _ = step(scheduler, runner)
    assert output.num_scheduled_tokens == {"b": 1, "c": 1}  # a left; c (not d) takes its seat
    assert output.freed_request_ids == ["a"]
    assert [r.request_id for r in scheduler.waiting] == ["d"]


def test_fcfs_head_of_line_blocks_when_the_head_does_not_fit():
    scheduler = make_scheduler(4, BS)
    runner = FakeRunner(BS)
    scheduler.add_request(make_request("a", [1] * 8, max_tokens=2, ignore_eos=True))  # 2 blocks
    scheduler.add_request(make_request("b", [2] * 9, max_tokens=2, ignore_eos=True))  # 3 blocks: no room
    scheduler.add_request(make_request("c", [3] * 2, max_tokens=2, ignore_eos=True))  # would fit
    output, _, _ = step(scheduler, runner)
    assert output.num_scheduled_tokens == {"a": 8}
    assert [r.request_id for r in scheduler.waiting] == ["b", "c"]


# ---- what the workers are sent ------------------------------------------------


def test_new_then_cached_request_data_and_chunked_prefill():
    scheduler = make_scheduler(16, BS, max_num_batched_tokens=4)
    runner = FakeRunner(BS, scripted({"a": [42, 43, 44]}))
    params = dict(max_tokens=3, temperature=0.0)
    request = make_request("a", list(range(10, 20)), **params)  # 10 tokens: chunks 4, 4, 2
    scheduler.add_request(request)

    output, runner_output, outputs = step(scheduler, runner)
    assert output.num_scheduled_tokens == {"a": 4}
    [new] = output.new_requests
    assert new == NewRequestData("a", list(range(10, 20)), 10, [0], 0, request.sampling_params, 0)
    assert output.cached_requests == []
    assert runner_output.sampled_token_ids == {} and outputs == []
    assert request.num_computed_tokens == 4 and request.num_cached_tokens == 0

    output, runner_output, outputs = step(scheduler, runner)
    assert output.new_requests == []
    assert output.cached_requests == [CachedRequestData("a", [], 1, [1], 4)]
    assert runner_output.sampled_token_ids == {} and outputs == []

    output, runner_output, outputs = step(scheduler, runner)
    assert output.cached_requests == [CachedRequestData("a", [], 2, [2], 8)]
    assert output.num_scheduled_tokens == {"a": 2}
    assert runner_output.sampled_token_ids == {"a": 42}
    assert [(o.request_id, o.new_token_ids, o.finish_reason) for o in outputs] == [("a", [42], None)]

    output, _, _ = step(scheduler, runner)  # token 10 in block 2: no new block
    assert output.cached_requests == [CachedRequestData("a", [42], 3, [], 10)]
    output, _, outputs = step(scheduler, runner)  # token 11 fills block 2
    assert output.cached_requests == [CachedRequestData("a", [43], 3, [], 11)]
    assert outputs[0].finish_reason == "length"
    assert request.output_token_ids == [42, 43, 44]
    assert runner.computed_ranges["a"] == [(0, 4), (4, 8), (8, 10), (10, 11), (11, 12)]
    # The finished request's blocks are free; the workers hear of it next step.
    assert scheduler.kv.num_free_blocks == 16
    output = scheduler.schedule()
    assert output.freed_request_ids == ["a"] and output.is_empty
    runner.execute(output)
    assert runner.states == {}


def test_a_prefix_hit_is_sent_with_its_computed_tokens():
    scheduler = make_scheduler(16, BS)
    runner = FakeRunner(BS)
    prompt = list(range(1, 11))
    scheduler.add_request(make_request("a", prompt, max_tokens=1, ignore_eos=True))
    step(scheduler, runner)
    scheduler.add_request(make_request("b", prompt + [5], max_tokens=1, ignore_eos=True))
    output, _, _ = step(scheduler, runner)
    [new] = output.new_requests
    assert (new.request_id, new.num_computed_tokens, new.block_ids) == ("b", 8, [0, 1, 3])
    assert output.num_scheduled_tokens == {"b": 3}
    assert scheduler.stats().prefix_cache_hit_tokens == 8


# ---- preemption -----------------------------------------------------------------


def reference_outputs(requests_fn, **scheduler_kwargs):
    """Tokens and finish reasons of the same requests on a pool far too big to preempt."""
    scheduler = make_scheduler(1000, BS, **scheduler_kwargs)
    for request in requests_fn():
        scheduler.add_request(request)
    streamed, finish = run_to_end(scheduler, FakeRunner(BS))
    assert scheduler.num_preemptions_total == 0
    return streamed, finish


def test_preemption_of_the_most_recent_request_then_resume_with_the_same_tokens():
    def requests():
        return [make_request("a", [11] * 7, max_tokens=4, ignore_eos=True), make_request("b", [12] * 7, max_tokens=4, ignore_eos=True)]

    scheduler = make_scheduler(4, BS)
    runner = FakeRunner(BS)
    a, b = requests()
    scheduler.add_request(a)
    scheduler.add_request(b)
    output, _, _ = step(scheduler, runner)
    assert output.num_scheduled_tokens == {"a": 7, "b": 7}
    assert scheduler.kv.block_ids("a") == [0, 1] and scheduler.kv.block_ids("b") == [2, 3]
    step(scheduler, runner)  # tokens 7 fill blocks 1 and 3; pool full
    assert scheduler.kv.num_free_blocks == 0
    b_tokens_before = list(b.all_token_ids)

    output, _, _ = step(scheduler, runner)  # a needs a 3rd block: b is preempted
    assert output.num_scheduled_tokens == {"a": 1}
    assert output.freed_request_ids == ["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert scheduler.num_preemptions_total == 1
    assert "b" not in scheduler.kv.requests
    assert [r.request_id for r in scheduler.running] == ["a"]
    assert list(scheduler.waiting) == [b]
    assert scheduler.kv.block_ids("a") == [0, 1, 3]  # b freed tail first: 3 then 2
    assert b.all_token_ids == b_tokens_before  # its sampled tokens are kept

    output, _, outputs = step(scheduler, runner)  # b still does not fit
    assert output.num_scheduled_tokens == {"a": 1}
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("a", "length")]

    output, _, _ = step(scheduler, runner)  # a finished: b resumes from its cached first block
    [new] = output.new_requests
    assert new.request_id == "b" and new.token_ids == b_tokens_before
    assert new.num_computed_tokens == 4 and new.block_ids[0] == 2
    assert output.num_scheduled_tokens == {"b": 5}
    assert b.status == RequestStatus.RUNNING

    streamed, finish = run_to_end(scheduler, runner)
    assert b.status == RequestStatus.FINISHED_LENGTH
    assert scheduler.kv.num_free_blocks == 4
    ref_streamed, ref_finish = reference_outputs(requests)
    assert a.output_token_ids == ref_streamed["a"]
    assert b.output_token_ids == ref_streamed["b"]
    assert finish == {"b": "length"}


def test_preempted_request_goes_to_the_front_of_waiting():
    scheduler = make_scheduler(6, BS, max_num_seqs=3)
    runner = FakeRunner(BS)
    for rid in "abcd":
        scheduler.add_request(make_request(rid, [ord(rid)] * 8, max_tokens=8, ignore_eos=True))
    output, _, _ = step(scheduler, runner)
    assert output.num_scheduled_tokens == {"a": 8, "b": 8, "c": 8}
    output, _, _ = step(scheduler, runner)
    # a and b each need a new block: c is preempted, then the pool suffices.
    assert output.num_scheduled_tokens == {"a": 1, "b": 1}
    assert output.freed_request_ids == ["c"]
    assert [r.request_id for r in scheduler.waiting] == ["c", "d"]


def test_a_request_that_cannot_fit_preempts_itself():
    scheduler = make_scheduler(3, BS)
    runner = FakeRunner(BS)
    a = make_request("a", [1] * 5, max_tokens=7, ignore_eos=True)  # blocks 0 1
    b = make_request("b", [2] * 4, max_tokens=7, ignore_eos=True)  # block 2
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler, runner)
    output, _, _ = step(scheduler, runner)  # b's token 4 needs a block; b is the newest
    assert output.num_scheduled_tokens == {"a": 1}
    assert output.freed_request_ids == ["b"]
    assert b.num_preemptions == 1 and a.num_preemptions == 0
    assert scheduler.kv.block_ids("a") == [0, 1] and scheduler.kv.num_free_blocks == 1


def test_samples_waiting_for_their_first_hold_no_blocks():
    """a runs; p#0 and p#1 arrive on a 4-block pool: p#1 waits for p#0 to compute the prompt
    holding nothing, so a and p#0 preempt each other as any two requests would, and every
    output equals that of a pool big enough never to preempt (with and without the prefix
    cache; a tight token budget must not livelock either)."""
    def requests():
        return [make_request("a", [1] * 4, max_tokens=8, ignore_eos=True),
                *make_siblings("p", [5] * 7, 2, max_tokens=8, ignore_eos=True)]

    for kwargs in ({}, {"max_num_batched_tokens": 4, "enable_prefix_caching": False}):
        scheduler = make_scheduler(4, BS, max_model_len=16, **kwargs)
        runner = FakeRunner(BS)
        a, first, second = requests()
        scheduler.add_request(a)
        step(scheduler, runner)
        scheduler.add_request(first, [second])
        if kwargs:  # no prefix cache: nothing to share, both samples queue at once
            assert list(scheduler.waiting) == [first, second]
        else:
            assert second in scheduler.held_samples and list(scheduler.waiting) == [first]
            step(scheduler, runner)
            assert "p#1" not in scheduler.kv.requests
        run_to_end(scheduler, runner, max_steps=80)
        assert scheduler.kv.num_free_blocks == 4
        ref_streamed, _ = reference_outputs(requests, max_model_len=16)
        assert {r.request_id: r.output_token_ids for r in (a, first, second)} == ref_streamed


def test_no_waiting_request_is_admitted_in_a_step_that_preempted():
    # Without prefix caching and with a small budget, the victim could be re-admitted
    # at once with a small chunk; the step that preempted must not admit it.
    scheduler = make_scheduler(4, BS, max_num_batched_tokens=3, enable_prefix_caching=False)
    runner = FakeRunner(BS)
    scheduler.add_request(make_request("a", [1] * 3, max_tokens=13, ignore_eos=True))
    scheduler.add_request(make_request("b", [2] * 5, max_tokens=11, ignore_eos=True))
    history = []
    for _ in range(8):
        output, _, _ = step(scheduler, runner)
        history.append(output)
        check_kv(scheduler.kv)
        if output.freed_request_ids:
            break
    assert [o.num_scheduled_tokens for o in history] == [
        {"a": 3}, {"a": 1, "b": 2}, {"a": 1, "b": 2}, {"a": 1, "b": 1},
        {"a": 1, "b": 1}, {"a": 1, "b": 1}, {"a": 1}]
    assert history[-1].freed_request_ids == ["b"]
    assert history[-1].new_requests == []
    assert scheduler.kv.num_free_blocks == 1  # room for b's first chunk, but not this step
    output, _, _ = step(scheduler, runner)
    assert output.num_scheduled_tokens == {"a": 1, "b": 2}
    assert [n.request_id for n in output.new_requests] == ["b"]


def test_preemption_under_load_gives_the_same_tokens_as_a_huge_pool():
    def requests():
        return [make_request(f"r{i}", [i + 3] * (3 + 2 * i), max_tokens=6 + i, ignore_eos=True)
                for i in range(6)]

    scheduler = make_scheduler(6, BS, max_num_batched_tokens=8)
    for request in requests():
        scheduler.add_request(request)
    streamed, finish = run_to_end(scheduler, FakeRunner(BS))
    assert scheduler.num_preemptions_total > 0
    assert (streamed, finish) == reference_outputs(requests, max_num_batched_tokens=8)
    assert scheduler.kv.num_free_blocks == 6


# ---- stop conditions ---------------------------------------------------------------


def finish_of(scripts, max_model_len=64, **params):
    scheduler = make_scheduler(32, BS, max_model_len=max_model_len)
    runner = FakeRunner(BS, scripted(scripts, default=5))
    request = make_request("a", [1, 1, 1], **params)
    scheduler.add_request(request)
    run_to_end(scheduler, runner)
    assert scheduler.kv.num_free_blocks == 32
    return request.output_token_ids, request.status, request.stop_reason


def test_max_tokens():
    assert finish_of({"a": [5, 6, 7, 8]}, max_tokens=3) == ([5, 6, 7], RequestStatus.FINISHED_LENGTH, None)


def test_eos_stops_and_is_kept_unless_ignore_eos():
    assert finish_of({"a": [5, EOS, 6]}, max_tokens=5) == ([5, EOS], RequestStatus.FINISHED_STOPPED, None)
    assert finish_of({"a": [5, EOS, 6]}, max_tokens=4, ignore_eos=True) == (
        [5, EOS, 6, 5], RequestStatus.FINISHED_LENGTH, None)


def test_stop_token_ids_set_stop_reason():
    assert finish_of({"a": [5, 9, 6]}, max_tokens=5, stop_token_ids=[9, 10]) == (
        [5, 9], RequestStatus.FINISHED_STOPPED, 9)
    # stop_token_ids still apply with ignore_eos
    assert finish_of({"a": [EOS, 10]}, max_tokens=5, ignore_eos=True, stop_token_ids=[10]) == (
        [EOS, 10], RequestStatus.FINISHED_STOPPED, 10)


def test_min_tokens_masks_eos_and_stop_tokens():
    assert finish_of({"a": [EOS, 9, EOS]}, max_tokens=5, min_tokens=2, stop_token_ids=[9]) == (
        [EOS, 9], RequestStatus.FINISHED_STOPPED, 9)
    assert finish_of({"a": [EOS, EOS, EOS]}, max_tokens=5, min_tokens=3) == (
        [EOS, EOS, EOS], RequestStatus.FINISHED_STOPPED, None)


def test_eos_on_the_last_allowed_token_is_a_stop():
    assert finish_of({"a": [5, EOS]}, max_tokens=2) == ([5, EOS], RequestStatus.FINISHED_STOPPED, None)


def test_max_model_len_finishes_with_length():
    # 3 prompt tokens, max_model_len 8: at most 5 tokens, whatever max_tokens or min_tokens say.
    assert finish_of({}, max_model_len=8, max_tokens=None) == ([5] * 5, RequestStatus.FINISHED_LENGTH, None)
    assert finish_of({}, max_model_len=8, max_tokens=20, min_tokens=10) == (
        [5] * 5, RequestStatus.FINISHED_LENGTH, None)


def test_check_stop_directly():
    request = make_request("a", [1, 2], max_tokens=3, stop_token_ids=[4])
    request.append_output_token(3)
    assert check_stop(request, max_model_len=100) is None
    request.append_output_token(4)
    assert check_stop(request, max_model_len=100) == RequestStatus.FINISHED_STOPPED
    assert request.stop_reason == 4
    assert RequestStatus.FINISHED_STOPPED.finish_reason == "stop"
    assert RequestStatus.FINISHED_LENGTH.finish_reason == "length"
    assert RequestStatus.FINISHED_ABORTED.finish_reason == "abort"
    assert RequestStatus.RUNNING.finish_reason is None


# ---- abort ---------------------------------------------------------------------


def test_abort_running_and_waiting_requests_frees_every_block():
    scheduler = make_scheduler(4, BS, max_num_seqs=1)
    runner = FakeRunner(BS)
    a = make_request("a", [1] * 6, max_tokens=10, ignore_eos=True)
    b = make_request("b", [2] * 6, max_tokens=10, ignore_eos=True)
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler, runner)
    assert scheduler.kv.num_free_blocks == 2
    scheduler.finish_requests(["a", "b", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert a.status == b.status == RequestStatus.FINISHED_ABORTED
    assert scheduler.kv.num_free_blocks == 4 and scheduler.kv.requests == {}
    assert not scheduler.has_unfinished_requests()
    assert scheduler.running == [] and list(scheduler.waiting) == []
    output = scheduler.schedule()
    assert output.freed_request_ids == ["a"]  # the workers never saw b
    assert output.is_empty
    runner.execute(output)
    assert runner.states == {}
    scheduler.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)  # twice: a no-op


def test_abort_during_a_step_skips_the_update():
    scheduler = make_scheduler(4, BS)
    runner = FakeRunner(BS)
    a = make_request("a", [1] * 3, max_tokens=10, ignore_eos=True)
    scheduler.add_request(a)
    output = scheduler.schedule()
    runner_output = runner.execute(output)
    scheduler.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert scheduler.update_from_output(output, runner_output) == []
    assert a.output_token_ids == [] and a.status == RequestStatus.FINISHED_ABORTED
    assert scheduler.kv.num_free_blocks == 4


def test_abort_of_a_preempted_request():
    scheduler = make_scheduler(4, BS)
    runner = FakeRunner(BS)
    scheduler.add_request(make_request("a", [11] * 7, max_tokens=4, ignore_eos=True))
    scheduler.add_request(make_request("b", [12] * 7, max_tokens=4, ignore_eos=True))
    for _ in range(3):
        step(scheduler, runner)
    assert scheduler.requests["b"].status == RequestStatus.PREEMPTED
    scheduler.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    assert list(scheduler.waiting) == []
    output = scheduler.schedule()
    assert output.freed_request_ids == []  # already freed when preempted
    runner.execute(output)
    assert "b" not in runner.states


# ---- parallel sampling ------------------------------------------------------------


def test_parallel_sampling_samples_share_the_first_samples_prompt_blocks():
    scheduler = make_scheduler(32, BS)
    runner = FakeRunner(BS)
    prompt = list(range(1, 11))  # 10 tokens: blocks 0 1 full, block 2 holds tokens 8, 9
    samples = make_siblings("p", prompt, 4, max_tokens=3, ignore_eos=True)
    add_requests(scheduler, samples)
    assert [r.request_id for r in scheduler.waiting] == ["p#0"]
    assert scheduler.stats().num_waiting == 4

    output, _, _ = step(scheduler, runner)
    assert output.num_scheduled_tokens == {"p#0": 10}
    # The first sampled: the others, holding no blocks yet, go to the front of the queue.
    assert [r.request_id for r in scheduler.waiting] == ["p#1", "p#2", "p#3"]
    assert [scheduler.kv.block_ids(s.request_id) for s in samples[1:]] == [[], [], []]

    output, _, _ = step(scheduler, runner)
    # They hit the two full blocks in the prefix cache and compute the partial one themselves.
    assert output.num_scheduled_tokens == {"p#0": 1, "p#1": 2, "p#2": 2, "p#3": 2}
    assert output.cached_requests == [CachedRequestData("p#0", [samples[0].output_token_ids[0]], 3, [], 10)]
    assert [(n.request_id, n.block_ids, n.num_computed_tokens, n.sample_index) for n in output.new_requests] == [
        ("p#1", [0, 1, 3], 8, 1), ("p#2", [0, 1, 4], 8, 2), ("p#3", [0, 1, 5], 8, 3)]
    assert [b.ref_count for b in scheduler.kv.pool.blocks[:2]] == [4, 4]
    assert scheduler.kv.pool.num_blocks - scheduler.kv.num_free_blocks == 6  # 4 independent: 12
    assert all(s.num_cached_tokens == 8 for s in samples[1:])

    run_to_end(scheduler, runner)
    for sample in samples[1:]:
        assert runner.computed_ranges[sample.request_id] == [(8, 10), (10, 11), (11, 12)]
    assert len({tuple(s.output_token_ids) for s in samples}) == 4  # sample_index makes the fake model differ
    for sample in samples:
        expected, tokens = [], list(prompt)
        for _ in range(3):
            expected.append(fake_token(sample.sample_index, tokens, 50))
            tokens.append(expected[-1])
        assert sample.output_token_ids == expected
    assert scheduler.kv.num_free_blocks == 32


def test_parallel_sampling_uses_fewer_blocks_than_independent_requests():
    prompt = list(range(1, 15))

    def peak_blocks(requests):
        scheduler = make_scheduler(64, BS)
        add_requests(scheduler, requests)
        runner, peak = FakeRunner(BS), 0
        while scheduler.has_unfinished_requests():
            output = scheduler.schedule()  # measured before finished requests free their blocks
            peak = max(peak, scheduler.kv.pool.num_blocks - scheduler.kv.num_free_blocks)
            scheduler.update_from_output(output, runner.execute(output))
            check_kv(scheduler.kv)
        assert scheduler.kv.num_free_blocks == 64
        return peak

    shared = peak_blocks(make_siblings("p", prompt, 4, max_tokens=4, ignore_eos=True))
    independent = peak_blocks([make_request(f"q{i}", prompt, max_tokens=4, ignore_eos=True) for i in range(4)])
    # 14 prompt + 3 computed output tokens = 17 tokens = 5 blocks per request.
    assert independent == 4 * 5
    # Samples 2..4 run one step behind the first: when they reach their 5th block the
    # first has finished; 3 shared full blocks + 3 x (own block 3 + block 4).
    assert shared == 3 + 3 * 2


def test_parallel_sampling_at_a_block_boundary_recomputes_the_last_full_block():
    scheduler = make_scheduler(16, BS)
    runner = FakeRunner(BS)
    samples = make_siblings("p", list(range(1, 9)), 2, max_tokens=3, ignore_eos=True)  # 8 tokens
    add_requests(scheduler, samples)
    step(scheduler, runner)
    output, _, _ = step(scheduler, runner)
    # A hit leaves the last prompt token to compute: p#1 shares block 0 and writes tokens 4..7 anew.
    assert output.num_scheduled_tokens == {"p#0": 1, "p#1": 4}
    assert scheduler.kv.block_ids("p#0") == [0, 1, 2]
    assert scheduler.kv.block_ids("p#1") == [0, 3]
    run_to_end(scheduler, runner)
    assert scheduler.kv.num_free_blocks == 16


def test_abort_a_held_sample_and_a_first_sample_others_wait_for():
    scheduler = make_scheduler(16, BS, max_num_batched_tokens=4)
    runner = FakeRunner(BS)
    samples = make_siblings("p", list(range(1, 11)), 3, max_tokens=2, ignore_eos=True)
    add_requests(scheduler, samples)
    step(scheduler, runner)  # the first computed 4 of its 10 prompt tokens
    scheduler.finish_requests(["p#1"], RequestStatus.FINISHED_ABORTED)
    assert scheduler.stats().num_waiting == 1
    scheduler.finish_requests(["p#0"], RequestStatus.FINISHED_ABORTED)
    # The remaining sample runs on its own, recomputing what the first had computed.
    assert list(scheduler.waiting) == [samples[2]] and len(scheduler.held_samples) == 0
    assert scheduler.kv.num_free_blocks == 16
    run_to_end(scheduler, runner)
    assert samples[2].status == RequestStatus.FINISHED_LENGTH
    assert scheduler.kv.num_free_blocks == 16


def test_a_sample_added_after_the_first_computed_its_prompt_uses_the_prefix_cache():
    scheduler = make_scheduler(16, BS)
    runner = FakeRunner(BS)
    first, second = make_siblings("p", list(range(1, 11)), 2, max_tokens=3, ignore_eos=True)
    scheduler.add_request(first)
    step(scheduler, runner)
    scheduler.add_request(second)
    assert list(scheduler.waiting) == [second]
    output, _, _ = step(scheduler, runner)
    assert output.new_requests[0].num_computed_tokens == 8  # two cached full blocks


def test_stats_and_unfinished_counts():
    scheduler = make_scheduler(8, BS)
    runner = FakeRunner(BS)
    scheduler.add_request(make_request("a", [1] * 5, max_tokens=2, ignore_eos=True))
    assert scheduler.num_unfinished_requests == 1
    step(scheduler, runner)
    stats = scheduler.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_used_slots, stats.num_unfilled_slots) == (1, 0, 8, 3)
    assert stats.kv_cache_usage == pytest.approx(2 / 8)
    run_to_end(scheduler, runner)
    assert scheduler.num_unfinished_requests == 0
