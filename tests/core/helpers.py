"""Shared helpers for the core unit tests: request factory, a plain-data fake
model runner that mirrors the worker's view of the batch, and pool invariants.

Nothing here mocks a core class: the scheduler, KV cache manager and block pool
are the real ones; only the model (which would sample tokens) is replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from dataclasses import dataclass

from pagedllm.core.block_pool import BlockPool
from pagedllm.core.kv_cache_manager import KVCacheManager, cdiv
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.request import Request
from pagedllm.sampling_params import SamplingParams

EOS = 2


def make_request(request_id: str, prompt_token_ids: list[int], eos: int = EOS, sample_index: int = 0,
                 cache_salt: str | None = None, **params) -> Request:
    """A Request whose sampling params carry the model's EOS id (as the engine fills it)."""
    sampling_params = dataclasses.replace(SamplingParams(**params), eos_token_ids=(eos,))
    return Request(request_id, prompt_token_ids, sampling_params, arrival_time=0.0, sample_index=sample_index,
                   cache_salt=cache_salt)


def make_siblings(request_id: str, prompt_token_ids: list[int], n: int, **params) -> list[Request]:
    """The n scheduler requests of one parallel-sampling prompt, named as the engine core names them."""
    return [make_request(f"{request_id}#{index}", prompt_token_ids, sample_index=index, n=n, **params)
            for index in range(n)]


def add_requests(scheduler: Scheduler, requests: list[Request]) -> None:
    """Queue requests as the engine core does: the samples of one prompt (id#0, id#1, ...)
    in one call, so that samples 2..n wait for the first to compute the prompt."""
    groups: dict[str, list[Request]] = {}
    for request in requests:
        groups.setdefault(request.request_id.split("#")[0], []).append(request)
    for samples in groups.values():
        scheduler.add_request(samples[0], samples[1:])


def fake_token(sample_index: int, token_ids: list[int], vocab_size: int) -> int:
    """A deterministic 'model': the next token is a hash of the sample index and all tokens so far."""
    digest = hashlib.blake2b(repr((sample_index, token_ids)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % vocab_size


@dataclass
class WorkerState:
    token_ids: list[int]
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    sample_index: int


class FakeRunner:
    """Keeps the worker-side copy of every request, built only from SchedulerOutputs
    (new requests in full, known ones as deltas), and samples a token for each
    request whose scheduled tokens reach the end of its known tokens.

    `token_fn(request_id, state)` picks the sampled token; the default hashes the
    request's tokens (fake_token).

    It also simulates the KV pool: the "K/V" written at a position is the prefix of
    tokens up to it. Each step runs the block copies (all reads before any write),
    writes the scheduled tokens' K/V into their slots, then checks that every slot a
    scheduled request attends to holds exactly its own prefix: prefix hits, forks,
    copy-on-write and eviction must never serve another request's K/V."""

    def __init__(self, block_size: int, token_fn=None, vocab_size: int = 50,
                 sliding_window: int | None = None) -> None:
        self.block_size = block_size
        # Attention sees only the last `sliding_window` keys of each query (None: all).
        self.sliding_window = sliding_window
        self.states: dict[str, WorkerState] = {}
        self.vocab_size = vocab_size
        self.token_fn = token_fn or (lambda rid, s: fake_token(s.sample_index, s.token_ids, vocab_size))
        # request id -> list of (start, end) positions computed in each step
        self.computed_ranges: dict[str, list[tuple[int, int]]] = {}
        # (request id, position) of every sampled token: none may be sampled twice.
        self.sampled_positions: set[tuple[str, int]] = set()
        # slot -> the token prefix whose last token's K/V the slot holds
        self.kv_slots: dict[int, tuple[int, ...]] = {}

    def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        for request_id in output.freed_request_ids:
            assert request_id in self.states, f"freed {request_id} the worker never saw"
            del self.states[request_id]
        for new in output.new_requests:
            assert new.request_id not in self.states, f"{new.request_id} sent as new twice"
            self.states[new.request_id] = WorkerState(list(new.token_ids), new.num_prompt_tokens,
                                                      list(new.block_ids), new.num_computed_tokens,
                                                      new.sample_index)
        for delta in output.cached_requests:
            state = self.states[delta.request_id]
            state.token_ids.extend(delta.new_token_ids)
            state.block_ids[delta.block_table_start:] = delta.new_block_ids
            state.num_computed_tokens = delta.num_computed_tokens
        self._run_kv(output)
        sampled = {}
        for request_id, num_new in output.num_scheduled_tokens.items():
            state = self.states[request_id]
            start, end = state.num_computed_tokens, state.num_computed_tokens + num_new
            assert 0 < num_new and end <= len(state.token_ids)
            assert len(state.block_ids) >= cdiv(end, self.block_size)
            self.computed_ranges.setdefault(request_id, []).append((start, end))
            if end == len(state.token_ids):
                key = (request_id, end)
                assert key not in self.sampled_positions, f"{request_id} sampled position {end} twice"
                self.sampled_positions.add(key)
                sampled[request_id] = self.token_fn(request_id, state)
        return ModelRunnerOutput(sampled_token_ids=sampled)


    def _slot(self, state: WorkerState, position: int) -> int:
        return state.block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def _run_kv(self, output: SchedulerOutput) -> None:
        for request_id, num_new in output.num_scheduled_tokens.items():
            state = self.states[request_id]
            for position in range(state.num_computed_tokens, state.num_computed_tokens + num_new):
                self.kv_slots[self._slot(state, position)] = tuple(state.token_ids[:position + 1])
        for request_id, num_new in output.num_scheduled_tokens.items():
            state = self.states[request_id]
            first_key = 0
            if self.sliding_window:
                first_key = max(0, state.num_computed_tokens - self.sliding_window + 1)
            for position in range(first_key, state.num_computed_tokens + num_new):
                held = self.kv_slots.get(self._slot(state, position))
                assert held == tuple(state.token_ids[:position + 1]), (
                    f"{request_id} reads wrong K/V at position {position}: {held}")


def step(scheduler: Scheduler, runner: FakeRunner, check: bool = True):
    """One engine step: schedule, (check), run the fake model, update."""
    output = scheduler.schedule()
    runner_output = runner.execute(output)
    if check:
        check_worker_view(scheduler, output, runner)
    outputs = scheduler.update_from_output(output, runner_output)
    return output, runner_output, outputs


def check_worker_view(scheduler: Scheduler, output: SchedulerOutput, runner: FakeRunner) -> None:
    """The worker's copy (rebuilt from deltas) equals the scheduler's state, and a
    step writes only blocks with ref count 1, never the same slot twice."""
    kv = scheduler.kv
    block_size = kv.block_size
    written_slots: set[int] = set()
    assert len(output.num_scheduled_tokens) <= scheduler.max_num_seqs
    assert output.total_num_scheduled_tokens <= scheduler.max_num_batched_tokens
    for request_id, num_new in output.num_scheduled_tokens.items():
        request = scheduler.requests[request_id]
        state = runner.states[request_id]
        assert state.token_ids == request.all_token_ids
        assert state.block_ids == kv.block_ids(request_id)
        assert state.num_computed_tokens == request.num_computed_tokens
        for position in range(state.num_computed_tokens, state.num_computed_tokens + num_new):
            block = kv.requests[request_id].blocks[position // block_size]
            # Invariant 5: a block is written only when its ref count is 1.
            assert block.ref_count == 1, (request_id, position, block)
            slot = block.block_id * block_size + position % block_size
            assert slot not in written_slots, f"slot {slot} written twice in one step"
            written_slots.add(slot)


def check_pool(pool: BlockPool) -> None:
    """Free queue, ref counts and the prefix-cache map agree."""
    ref_counts = [block.ref_count for block in pool.blocks]
    assert min(ref_counts) >= 0
    free_ids = pool.free_queue.block_ids()
    assert len(free_ids) == len(set(free_ids)) == pool.num_free_blocks
    assert set(free_ids) == {block.block_id for block in pool.blocks if block.ref_count == 0}
    for block in pool.blocks:
        in_queue = block.ref_count == 0
        assert (block.prev_free is not None) == in_queue and (block.next_free is not None) == in_queue
    for block_hash, block in pool.cached_blocks.items():
        assert block.block_hash == block_hash
    assert sum(block.block_hash is not None for block in pool.blocks) == len(pool.cached_blocks)


def held_blocks(kv: KVCacheManager, request_id: str):
    """The blocks a request holds a reference to (not those released as out of its window)."""
    held = kv.requests[request_id]
    return held.blocks[held.num_released:]


def check_kv(kv: KVCacheManager) -> None:
    """Every block's ref count equals the number of requests holding it."""
    check_pool(kv.pool)
    holders = Counter(block.block_id for rid in kv.requests for block in held_blocks(kv, rid))
    for rid in kv.requests:
        blocks = held_blocks(kv, rid)
        assert len({b.block_id for b in blocks}) == len(blocks), "a request holds a block twice"
    assert sum(block.ref_count for block in kv.pool.blocks) == sum(holders.values())
    for block in kv.pool.blocks:
        assert block.ref_count == holders[block.block_id], block


def make_scheduler(num_blocks: int, block_size: int, max_num_seqs: int = 8, max_num_batched_tokens: int = 64,
                   max_model_len: int = 64, enable_prefix_caching: bool = True,
                   sliding_window: int | None = None) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching, sliding_window=sliding_window)
    return Scheduler(kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                     max_model_len=max_model_len)
