"""KVCacheManager: exact block ids for allocation, prefix hits, copy-on-write, free."""

from __future__ import annotations

import pytest

from pagedllm.core.kv_cache_manager import Allocation, KVCacheManager
from tests.core.helpers import check_kv, make_request

BS = 4  # block size of every test here


def compute(kv: KVCacheManager, request, num_new: int, hits=None) -> Allocation:
    """What one scheduler step does for one request: allocate, compute, cache full blocks."""
    hits = hits or []
    allocation = kv.allocate_slots(request, num_new, hits)
    assert allocation is not None
    request.num_computed_tokens += len(hits) * BS + num_new
    kv.cache_full_blocks(request)
    check_kv(kv)
    return allocation


def admit(kv: KVCacheManager, request) -> Allocation:
    """Admit a request with its prefix hits and compute all its tokens."""
    hits = kv.get_computed_blocks(request)
    return compute(kv, request, request.num_tokens - len(hits) * BS, hits)


def snapshot(kv: KVCacheManager):
    return ([b.ref_count for b in kv.pool.blocks], kv.pool.free_queue.block_ids(),
            {rid: [b.block_id for b in held.blocks] for rid, held in kv.requests.items()},
            dict(kv.pool.cached_blocks))


def test_allocate_slots_exact_block_ids_as_a_request_grows():
    kv = KVCacheManager(8, BS)
    request = make_request("a", list(range(10, 20)))  # 10 tokens: 3 blocks
    assert compute(kv, request, 10) == Allocation(0, [0, 1, 2])
    assert kv.block_ids("a") == [0, 1, 2]
    request.append_output_token(7)  # token 10 goes into block 2 (offset 2)
    assert compute(kv, request, 1) == Allocation(3, [])
    request.append_output_token(7)
    assert compute(kv, request, 1) == Allocation(3, [])  # offset 3, block 2 now full
    request.append_output_token(7)  # token 12 starts block 3
    assert compute(kv, request, 1) == Allocation(3, [3])
    assert kv.block_ids("a") == [0, 1, 2, 3]
    assert kv.num_free_blocks == 4
    # Only the full blocks 0..2 are registered in the prefix cache.
    assert [b.block_hash is not None for b in kv.pool.blocks[:4]] == [True, True, True, False]
    assert request.block_hashes[:3] == [kv.pool.blocks[i].block_hash for i in range(3)]


def test_two_requests_get_disjoint_blocks_in_lru_order():
    kv = KVCacheManager(6, BS)
    a = make_request("a", [1] * 5)
    b = make_request("b", [2] * 3)
    assert compute(kv, a, 5) == Allocation(0, [0, 1])
    assert compute(kv, b, 3) == Allocation(0, [2])
    kv.free(a)  # tail first: 1 then 0
    assert kv.pool.free_queue.block_ids() == [3, 4, 5, 1, 0]
    c = make_request("c", [3] * 13)
    assert admit(kv, c) == Allocation(0, [3, 4, 5, 1])
    assert kv.pool.free_queue.block_ids() == [0]


def test_chunked_allocation_for_a_long_prompt():
    kv = KVCacheManager(8, BS)
    request = make_request("a", list(range(100, 111)))  # 11 tokens
    assert compute(kv, request, 5) == Allocation(0, [0, 1])
    assert compute(kv, request, 2) == Allocation(2, [])  # tokens 5, 6 in block 1
    assert compute(kv, request, 4) == Allocation(2, [2])  # tokens 7..10
    assert kv.block_ids("a") == [0, 1, 2]


def test_allocate_returns_none_and_changes_nothing_when_the_pool_is_too_small():
    kv = KVCacheManager(3, BS)
    a = make_request("a", [1] * 8)
    compute(kv, a, 8)  # blocks 0, 1
    b = make_request("b", [5] * 9)  # needs 3 blocks, 1 free
    before = snapshot(kv)
    assert kv.allocate_slots(b, 9) is None
    assert snapshot(kv) == before
    assert "b" not in kv.requests
    # A running request that needs one more block than is free.
    c = make_request("c", [6] * 4)
    compute(kv, c, 4)  # block 2, pool full
    c.append_output_token(9)
    before = snapshot(kv)
    assert kv.allocate_slots(c, 1) is None
    assert snapshot(kv) == before
    kv.free(a)
    assert kv.allocate_slots(c, 1) == Allocation(1, [1])  # block 1 was freed after block 0


def test_prefix_hit_uses_the_cached_blocks_and_stats():
    kv = KVCacheManager(10, BS)
    a = make_request("a", list(range(1, 11)))  # blocks [1..4] [5..8] [9 10]
    admit(kv, a)
    assert kv.block_ids("a") == [0, 1, 2]
    b = make_request("b", list(range(1, 9)) + [50, 51, 52])
    hits = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1]
    assert compute(kv, b, 3, hits) == Allocation(0, [0, 1, 3])
    assert b.num_computed_tokens == 11
    assert [blk.ref_count for blk in kv.pool.blocks[:4]] == [2, 2, 1, 1]
    assert kv.prefix_cache_stats.num_queried_tokens == 10 + 11
    assert kv.prefix_cache_stats.num_hit_tokens == 8


def test_prefix_hit_is_chained_same_second_block_after_a_different_first_is_a_miss():
    kv = KVCacheManager(10, BS)
    admit(kv, make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # Same second block [5..8] after a different first block: no hit at all.
    c = make_request("c", [9, 9, 9, 9, 5, 6, 7, 8, 9])
    assert kv.get_computed_blocks(c) == []
    # Same first block, different second: one hit only.
    d = make_request("d", [1, 2, 3, 4, 5, 6, 7, 0, 9])
    assert [h.block_id for h in kv.get_computed_blocks(d)] == [0]


def test_cache_salt_shares_blocks_only_between_requests_with_the_same_salt():
    kv = KVCacheManager(12, BS)
    prompt = list(range(1, 10))  # blocks [1..4] [5..8] [9]
    admit(kv, make_request("a", prompt, cache_salt="tenant-a"))
    assert kv.block_ids("a") == [0, 1, 2]
    same = make_request("same", prompt, cache_salt="tenant-a")
    assert [h.block_id for h in kv.get_computed_blocks(same)] == [0, 1]
    assert kv.get_computed_blocks(make_request("other", prompt, cache_salt="tenant-b")) == []
    unsalted = make_request("unsalted", prompt)
    assert kv.get_computed_blocks(unsalted) == []
    # An unsalted request computes its own blocks, and a salted one never hits them.
    assert admit(kv, unsalted) == Allocation(0, [3, 4, 5])
    assert [h.block_id for h in kv.get_computed_blocks(make_request("plain", prompt))] == [3, 4]
    assert kv.get_computed_blocks(make_request("b", prompt, cache_salt="tenant-b")) == []


def test_a_prompt_of_exactly_n_cached_blocks_hits_n_minus_one():
    kv = KVCacheManager(10, BS)
    prompt = list(range(1, 13))  # exactly 3 full blocks
    admit(kv, make_request("a", prompt))
    assert kv.block_ids("a") == [0, 1, 2]
    b = make_request("b", prompt)
    hits = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1]  # at least one token left to compute
    # The last block is recomputed into a fresh block.
    assert compute(kv, b, 4, hits) == Allocation(0, [0, 1, 3])
    # One token more and all 3 full blocks hit.
    c = make_request("c", prompt + [77])
    assert [h.block_id for h in kv.get_computed_blocks(c)] == [0, 1, 2]
    # A one-token prompt never hits.
    assert kv.get_computed_blocks(make_request("d", [1])) == []


def test_hits_on_freed_but_cached_blocks_revive_them_and_count_against_free_blocks():
    kv = KVCacheManager(4, BS)
    a = make_request("a", list(range(1, 13)))  # full blocks 0 1 2, all cached
    admit(kv, a)
    kv.free(a)
    assert len(kv.pool.cached_blocks) == 3
    assert kv.num_free_blocks == 4
    assert kv.pool.free_queue.block_ids() == [3, 2, 1, 0]
    # b hits blocks 0 and 1 (free, cached) and needs 3 fresh blocks: 2 + 3 > 4 free.
    b = make_request("b", list(range(1, 9)) + [60] * 12)
    hits = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1]
    before = snapshot(kv)
    assert kv.allocate_slots(b, 12, hits) is None
    assert snapshot(kv) == before
    # With 2 fresh blocks it fits exactly: the hits leave the queue, 3 and 2 are taken.
    c = make_request("c", list(range(1, 9)) + [60] * 8)
    hits = kv.get_computed_blocks(c)
    assert compute(kv, c, 8, hits) == Allocation(0, [0, 1, 3, 2])
    assert kv.num_free_blocks == 0
    assert [blk.ref_count for blk in kv.pool.blocks] == [1, 1, 1, 1]
    assert kv.pool.lookup(a.block_hashes[2]) is None  # block 2 was evicted when reused
    assert kv.pool.lookup(a.block_hashes[1]) is kv.pool.blocks[1]


def test_free_returns_every_block():
    kv = KVCacheManager(6, BS)
    a = make_request("a", list(range(1, 10)))
    admit(kv, a)
    b = make_request("b", list(range(1, 10)) + [3])
    admit(kv, b)  # hits 0 1, gets block 3
    kv.free(a)
    assert kv.num_free_blocks == 6 - 3  # b still holds 0 1 3
    kv.free(b)
    assert kv.num_free_blocks == kv.pool.num_blocks == 6
    assert kv.requests == {} and kv.usage == 0.0
    kv.free(b)  # freeing an unknown request is a no-op, not a double free
    check_kv(kv)


def test_prompt_logprobs_requests_skip_the_prefix_cache():
    kv = KVCacheManager(10, BS)
    prompt = list(range(1, 10))
    admit(kv, make_request("a", prompt))
    b = make_request("b", prompt, prompt_logprobs=1)
    assert kv.get_computed_blocks(b) == []
    assert admit(kv, b) == Allocation(0, [3, 4, 5])
    assert kv.get_computed_blocks(make_request("c", prompt, prompt_logprobs=0)) == []


def test_no_hits_without_prefix_caching():
    kv = KVCacheManager(10, BS, enable_prefix_caching=False)
    prompt = list(range(1, 10))
    admit(kv, make_request("a", prompt))
    assert kv.pool.cached_blocks == {}
    assert kv.get_computed_blocks(make_request("b", prompt)) == []


def test_num_unfilled_slots():
    kv = KVCacheManager(10, BS)
    a = make_request("a", [1] * 5)
    b = make_request("b", [2] * 8)
    c = make_request("c", [3] * 3)  # not allocated
    compute(kv, a, 5)  # 2 blocks, 5 computed: 3 unfilled
    compute(kv, b, 8)  # 2 blocks full
    assert kv.num_unfilled_slots([a, b, c]) == 3
    a.append_output_token(1)
    kv.allocate_slots(a, 1)  # allocated, not computed yet
    assert kv.num_unfilled_slots([a]) == 3
    b.append_output_token(1)
    kv.allocate_slots(b, 1)  # a fresh block for token 8
    assert kv.num_unfilled_slots([a, b]) == 3 + 4


def test_reset_prefix_cache_drops_hits():
    kv = KVCacheManager(10, BS)
    prompt = list(range(1, 10))
    admit(kv, make_request("a", prompt))
    kv.reset_prefix_cache()
    assert kv.get_computed_blocks(make_request("b", prompt)) == []


@pytest.mark.parametrize("num_new", [1, 4, 5])
def test_allocation_block_ids_cover_exactly_the_new_tokens(num_new):
    kv = KVCacheManager(10, BS)
    request = make_request("a", [1] * (3 + num_new))
    compute(kv, request, 3)
    allocation = compute(kv, request, num_new)
    expected = -(-(3 + num_new) // BS)
    assert len(kv.block_ids("a")) == expected
    assert kv.block_ids("a")[allocation.first_changed_index:] == allocation.block_ids
