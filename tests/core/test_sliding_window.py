"""Blocks wholly before a uniform sliding window go back to the pool while the
request runs; their ids stay in its table, and freeing never frees them twice."""

from __future__ import annotations

from pagedllm.core.kv_cache_manager import KVCacheManager
from tests.core.helpers import make_request


def test_release_out_of_window_blocks_exact_ids():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False, sliding_window=6)
    request = make_request("r", list(range(10, 24)))  # 14 tokens -> blocks 0..3
    assert kv.allocate_slots(request, 14).block_ids == [0, 1, 2, 3]
    request.num_computed_tokens = 14
    # The next query (position 14) sees keys 9..14: blocks 0 and 1 (positions 0..7) are unneeded.
    kv.release_out_of_window_blocks(request)
    assert kv.num_free_blocks == 6
    assert kv.pool.free_queue.block_ids() == [4, 5, 6, 7, 1, 0]
    assert kv.block_ids("r") == [0, 1, 2, 3]  # the table keeps its shape
    kv.release_out_of_window_blocks(request)  # idempotent
    assert kv.num_free_blocks == 6
    request.num_computed_tokens = 16
    kv.release_out_of_window_blocks(request)  # keys 11..16 still need block 2
    assert kv.num_free_blocks == 6
    kv.free(request)
    assert kv.num_free_blocks == 8
    assert all(block.ref_count == 0 for block in kv.pool.blocks)


def test_no_window_releases_nothing():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    request = make_request("r", list(range(10, 24)))
    kv.allocate_slots(request, 14)
    request.num_computed_tokens = 14
    kv.release_out_of_window_blocks(request)
    assert kv.num_free_blocks == 4
