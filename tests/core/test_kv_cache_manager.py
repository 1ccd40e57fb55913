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
            {rid: [b.block_id for b in blocks] for rid, blocks in kv.req_to_blocks.items()},
            dict(kv.pool.cached_blocks))


def test_allocate_slots_exact_block_ids_as_a_request_grows():
    kv = KVCacheManager(8, BS)
    request = make_request("a", list(range(10, 20)))  # 10 tokens: 3 blocks
    assert compute(kv, request, 10) == Allocation(0, [0, 1, 2], [])
    assert kv.block_ids("a") == [0, 1, 2]
    request.append_output_token(7)  # token 10 goes into block 2 (offset 2)
    assert compute(kv, request, 1) == Allocation(3, [], [])
    request.append_output_token(7)
    assert compute(kv, request, 1) == Allocation(3, [], [])  # offset 3, block 2 now full
    request.append_output_token(7)  # token 12 starts block 3
    assert compute(kv, request, 1) == Allocation(3, [3], [])
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
    assert "b" not in kv.req_to_blocks
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


def test_fork_at_a_partial_block_copies_on_write_once_each_where_shared():
    kv = KVCacheManager(10, BS)
    source = make_request("s", list(range(1, 7)))  # 6 tokens: block 0 full, block 1 half
    admit(kv, source)
    source.append_output_token(40)
    child = make_request("c", list(range(1, 7)), sample_index=1)
    kv.fork(source, child, 5)  # the child shares tokens 0..4 and recomputes token 5
    child.num_computed_tokens = 5
    assert kv.block_ids("c") == [0, 1]
    assert [blk.ref_count for blk in kv.pool.blocks[:2]] == [2, 2]
    check_kv(kv)
    # The child writes token 5 into shared block 1: it copies it to a fresh block.
    assert compute(kv, child, 1) == Allocation(1, [2], [(1, 2)])
    assert kv.block_ids("c") == [0, 2]
    assert [blk.ref_count for blk in kv.pool.blocks[:3]] == [2, 1, 1]
    # The source writes token 6 into block 1, now its own: no copy.
    assert compute(kv, source, 1) == Allocation(2, [])
    assert kv.block_ids("s") == [0, 1]
    kv.free(source)
    kv.free(child)
    assert kv.num_free_blocks == 10


def test_fork_source_allocates_first_then_the_child_writes_in_place():
    kv = KVCacheManager(10, BS)
    source = make_request("s", list(range(1, 7)))
    admit(kv, source)
    source.append_output_token(40)
    children = [make_request(f"c{i}", list(range(1, 7)), sample_index=i) for i in (1, 2)]
    for child in children:
        kv.fork(source, child, 5)
        child.num_computed_tokens = 5
    assert [blk.ref_count for blk in kv.pool.blocks[:2]] == [3, 3]
    # Source writes token 6 into block 1 (ref 3): copies to 2.
    assert compute(kv, source, 1) == Allocation(1, [2], [(1, 2)])
    # First child: block 1 still ref 2: copies to 3.
    assert compute(kv, children[0], 1) == Allocation(1, [3], [(1, 3)])
    # Second child: block 1 is its alone now: writes in place.
    assert compute(kv, children[1], 1) == Allocation(2, [])
    assert kv.block_ids("s") == [0, 2]
    assert kv.block_ids("c1") == [0, 3]
    assert kv.block_ids("c2") == [0, 1]
    assert [blk.ref_count for blk in kv.pool.blocks[:4]] == [3, 1, 1, 1]


def test_copy_on_write_plus_a_fresh_block_in_one_allocation():
    kv = KVCacheManager(10, BS)
    source = make_request("s", list(range(1, 7)))
    admit(kv, source)
    child = make_request("c", list(range(1, 7)) + [8, 8, 8])
    kv.fork(source, child, 5)
    child.num_computed_tokens = 5
    # Tokens 5..8: the rest of shared block 1 (copied) and a fresh block.
    assert compute(kv, child, 4) == Allocation(1, [2, 3], [(1, 2)])
    assert kv.block_ids("c") == [0, 2, 3]


def test_a_fork_never_writes_into_a_block_the_prefix_cache_serves():
    # Regression: the child recomputes token 7, the last of full block 1. Once the
    # source is gone the child holds block 1 alone (ref 1), but block 1 is in the prefix
    # cache, so a request admitted in the same step could hit it while it is rewritten.
    # The child copies it; block 1 goes back to the free queue, still cached.
    kv = KVCacheManager(10, BS)
    source = make_request("s", list(range(1, 9)))  # 8 tokens: full blocks 0 1, both cached
    admit(kv, source)
    child = make_request("c", list(range(1, 9)), sample_index=1)
    kv.fork(source, child, 7)
    child.num_computed_tokens = 7
    kv.free(source)
    assert [b.ref_count for b in kv.pool.blocks[:2]] == [1, 1]
    assert compute(kv, child, 1) == Allocation(1, [2], [(1, 2)])
    assert kv.block_ids("c") == [0, 2]
    assert kv.pool.blocks[1].ref_count == 0
    assert kv.pool.free_queue.block_ids() == [3, 4, 5, 6, 7, 8, 9, 1]
    assert kv.pool.lookup(source.block_hashes[1]) is kv.pool.blocks[1]
    assert kv.pool.blocks[2].block_hash is None  # the equal copy stays uncached


def test_copy_on_write_is_atomic_when_no_block_is_free():
    kv = KVCacheManager(2, BS)
    source = make_request("s", [1, 2, 3, 4, 5, 6])
    admit(kv, source)  # blocks 0 1, pool full
    child = make_request("c", [1, 2, 3, 4, 5, 6])
    kv.fork(source, child, 5)
    child.num_computed_tokens = 5
    before = snapshot(kv)
    assert kv.allocate_slots(child, 1) is None
    assert snapshot(kv) == before


def test_fork_at_a_block_boundary_shares_only_full_blocks():
    kv = KVCacheManager(10, BS)
    source = make_request("s", list(range(1, 10)))  # 9 tokens: blocks 0 1 2(1 token)
    admit(kv, source)
    child = make_request("c", list(range(1, 10)))
    kv.fork(source, child, 8)
    child.num_computed_tokens = 8
    assert kv.block_ids("c") == [0, 1]
    assert compute(kv, child, 1) == Allocation(2, [3], [])


def test_free_returns_every_block():
    kv = KVCacheManager(6, BS)
    a = make_request("a", list(range(1, 10)))
    admit(kv, a)
    b = make_request("b", list(range(1, 10)) + [3])
    admit(kv, b)  # hits 0 1, gets block 3
    child = make_request("c", list(range(1, 10)))
    kv.fork(a, child, 9)
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 6 - 3  # the child still holds 0 1 2
    kv.free(child)
    assert kv.num_free_blocks == kv.pool.num_blocks == 6
    assert kv.req_to_blocks == {} and kv.usage == 0.0
    kv.free(child)  # freeing an unknown request is a no-op, not a double free
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


def test_fork_does_not_share_blocks_the_source_released_out_of_its_window():
    # Regression: with a sliding window the source gives back blocks wholly before its
    # window while it runs (their ids stay in its table, never read). fork() shared them
    # again: it revived free blocks (or added references to blocks since handed to other
    # requests), and the child could hold one block twice.
    kv = KVCacheManager(10, BS, enable_prefix_caching=False, sliding_window=4)
    source = make_request("s", list(range(1, 15)))  # 14 tokens
    compute(kv, source, 8)  # blocks 0 1
    kv.release_out_of_window_blocks(source)  # the next query (8) sees keys 5..8: block 0 goes
    assert kv.pool.free_queue.block_ids() == [2, 3, 4, 5, 6, 7, 8, 9, 0]
    compute(kv, source, 6)  # blocks 2 3
    child = make_request("c", list(range(1, 15)), sample_index=1)
    kv.fork(source, child, 13)
    assert kv.block_ids("c") == [0, 1, 2, 3]  # the table keeps its shape
    assert [b.ref_count for b in kv.pool.blocks[:4]] == [0, 2, 2, 2]
    assert kv.pool.free_queue.block_ids() == [4, 5, 6, 7, 8, 9, 0]
    check_kv(kv)
    kv.free(source)
    kv.free(child)
    assert kv.num_free_blocks == 10 and all(b.ref_count == 0 for b in kv.pool.blocks)


def test_a_fork_never_registers_a_released_block_in_the_prefix_cache():
    # Regression: with a sliding window, a fork's table starts with blocks its source
    # gave back (ids kept, never read). Registering the child's full blocks walked those
    # too: a released block since reused by another request (a different prefix) was
    # registered under the child's hash, and a later request with that prefix hit it.
    kv = KVCacheManager(9, BS, enable_prefix_caching=True, sliding_window=4)
    source = make_request("s", list(range(1, 15)))  # 14 tokens
    compute(kv, source, 8)  # blocks 0 1, both cached
    kv.release_out_of_window_blocks(source)  # block 0 back to the queue, still cached
    compute(kv, source, 6)  # blocks 2 3
    e = make_request("e", [90])
    compute(kv, e, 1)  # block 4
    d = make_request("d", [50] * 17)
    compute(kv, d, 17)  # blocks 5 6 7 8 0: block 0 now holds d's token 16 (hash evicted)
    assert kv.block_ids("d") == [5, 6, 7, 8, 0]
    assert kv.pool.lookup(source.block_hashes[0]) is None
    kv.free(e)
    child = make_request("c", list(range(1, 15)), sample_index=1)
    kv.fork(source, child, 13)
    child.num_computed_tokens = 13
    assert compute(kv, child, 1) == Allocation(3, [4], [(3, 4)])
    assert kv.pool.lookup(source.block_hashes[0]) is None
    assert kv.pool.blocks[0].block_hash is None
    assert kv.get_computed_blocks(make_request("f", [1, 2, 3, 4, 99])) == []
