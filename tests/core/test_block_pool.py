"""BlockPool: LRU free queue, O(1) removal, ref counts, prefix-cache map, eviction."""

from __future__ import annotations

import pytest

from pagedllm.core.block_hash import ROOT_HASH, extend_block_hashes, hash_block
from pagedllm.core.block_pool import BlockPool, FreeBlockQueue, Block
from tests.core.helpers import check_pool


def ids(blocks):
    return [block.block_id for block in blocks]


def test_new_pool_is_all_free_in_id_order():
    pool = BlockPool(5, enable_prefix_caching=True)
    assert pool.num_free_blocks == 5
    assert pool.free_queue.block_ids() == [0, 1, 2, 3, 4]
    assert pool.usage == 0.0
    assert [b.ref_count for b in pool.blocks] == [0] * 5
    check_pool(pool)


def test_pool_needs_a_block():
    with pytest.raises(ValueError):
        BlockPool(0, enable_prefix_caching=True)


def test_allocate_pops_oldest_and_sets_ref_count_one():
    pool = BlockPool(5, enable_prefix_caching=True)
    assert ids(pool.allocate(2)) == [0, 1]
    assert ids(pool.allocate(1)) == [2]
    assert pool.free_queue.block_ids() == [3, 4]
    assert [b.ref_count for b in pool.blocks] == [1, 1, 1, 0, 0]
    assert pool.num_free_blocks == 2
    assert pool.usage == pytest.approx(0.6)
    check_pool(pool)


def test_allocate_more_than_free_raises_and_changes_nothing():
    pool = BlockPool(3, enable_prefix_caching=True)
    pool.allocate(2)
    with pytest.raises(RuntimeError):
        pool.allocate(2)
    assert pool.free_queue.block_ids() == [2]
    assert [b.ref_count for b in pool.blocks] == [1, 1, 0]
    check_pool(pool)


def test_free_appends_to_the_tail_in_the_order_given():
    pool = BlockPool(6, enable_prefix_caching=True)
    blocks = pool.allocate(4)  # 0 1 2 3; free: 4 5
    pool.free([blocks[1]])
    assert pool.free_queue.block_ids() == [4, 5, 1]
    # A request's blocks are freed tail first: its tail is evicted before its head.
    pool.free(list(reversed([blocks[0], blocks[2], blocks[3]])))
    assert pool.free_queue.block_ids() == [4, 5, 1, 3, 2, 0]
    # LRU: the oldest free block is handed out first.
    assert ids(pool.allocate(4)) == [4, 5, 1, 3]
    assert pool.free_queue.block_ids() == [2, 0]
    check_pool(pool)


def test_shared_block_is_freed_only_when_last_reference_drops():
    pool = BlockPool(3, enable_prefix_caching=True)
    [block] = pool.allocate(1)
    pool.share([block])
    pool.share([block])
    assert block.ref_count == 3
    pool.free([block])
    pool.free([block])
    assert block.ref_count == 1
    assert pool.free_queue.block_ids() == [1, 2]
    pool.free([block])
    assert block.ref_count == 0
    assert pool.free_queue.block_ids() == [1, 2, 0]
    check_pool(pool)


def test_double_free_raises():
    pool = BlockPool(2, enable_prefix_caching=True)
    [block] = pool.allocate(1)
    pool.free([block])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([block])
    assert block.ref_count == 0
    assert pool.free_queue.block_ids() == [1, 0]
    check_pool(pool)


def test_double_free_of_a_never_allocated_block_raises():
    pool = BlockPool(2, enable_prefix_caching=True)
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([pool.blocks[1]])
    assert pool.free_queue.block_ids() == [0, 1]


def test_share_of_a_free_cached_block_removes_it_from_the_middle_of_the_queue():
    pool = BlockPool(5, enable_prefix_caching=True)
    blocks = pool.allocate(5)
    pool.cache(blocks[2], b"h2")
    pool.free(blocks)  # queue: 0 1 2 3 4
    assert pool.free_queue.block_ids() == [0, 1, 2, 3, 4]
    hit = pool.lookup(b"h2")
    assert hit is blocks[2]
    pool.share([hit])  # prefix hit on a freed-but-cached block revives it
    assert hit.ref_count == 1
    assert pool.free_queue.block_ids() == [0, 1, 3, 4]
    assert pool.num_free_blocks == 4
    assert hit.block_hash == b"h2" and pool.lookup(b"h2") is hit  # still cached
    check_pool(pool)
    # Freed again, it goes to the tail (most recently used).
    pool.free([hit])
    assert pool.free_queue.block_ids() == [0, 1, 3, 4, 2]
    check_pool(pool)


def test_free_queue_removal_of_head_tail_and_only_element():
    blocks = [Block(i) for i in range(3)]
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[0])
    assert queue.block_ids() == [1, 2]
    queue.remove(blocks[2])
    assert queue.block_ids() == [1]
    queue.remove(blocks[1])
    assert queue.block_ids() == [] and queue.num_free_blocks == 0
    with pytest.raises(RuntimeError):
        queue.pop_oldest()
    queue.append(blocks[2])
    queue.append(blocks[0])
    assert queue.block_ids() == [2, 0]
    assert queue.pop_oldest() is blocks[2]
    assert queue.block_ids() == [0]


def test_eviction_a_reused_cached_block_loses_its_hash():
    pool = BlockPool(3, enable_prefix_caching=True)
    blocks = pool.allocate(3)
    pool.cache(blocks[0], b"a")
    pool.cache(blocks[1], b"b")
    pool.free(list(reversed(blocks)))  # queue: 2 1 0
    assert pool.free_queue.block_ids() == [2, 1, 0]
    assert set(pool.cached_blocks) == {b"a", b"b"}
    # Block 2 (uncached) then block 1 (cached "b") are handed out: "b" is evicted.
    assert ids(pool.allocate(2)) == [2, 1]
    assert pool.lookup(b"b") is None
    assert blocks[1].block_hash is None
    assert pool.lookup(b"a") is blocks[0]  # the head of the prefix survives longest
    assert blocks[0].block_hash == b"a"
    check_pool(pool)
    assert ids(pool.allocate(1)) == [0]
    assert pool.cached_blocks == {}
    check_pool(pool)


def test_cache_keeps_the_first_of_two_equal_hash_blocks():
    pool = BlockPool(3, enable_prefix_caching=True)
    first, second, _ = pool.allocate(3)
    pool.cache(first, b"same")
    pool.cache(second, b"same")
    assert pool.lookup(b"same") is first
    assert first.block_hash == b"same"
    assert second.block_hash is None
    # Freeing and reusing the uncached copy does not disturb the cached one.
    pool.free([second])
    assert ids(pool.allocate(1)) == [1]
    assert pool.lookup(b"same") is first
    check_pool(pool)


def test_cache_is_idempotent_and_a_block_keeps_its_first_hash():
    pool = BlockPool(2, enable_prefix_caching=True)
    [block] = pool.allocate(1)
    pool.cache(block, b"x")
    pool.cache(block, b"x")
    pool.cache(block, b"y")
    assert pool.cached_blocks == {b"x": block}
    assert block.block_hash == b"x"


def test_cache_does_nothing_without_prefix_caching():
    pool = BlockPool(2, enable_prefix_caching=False)
    [block] = pool.allocate(1)
    pool.cache(block, b"x")
    assert pool.cached_blocks == {} and block.block_hash is None
    assert pool.lookup(b"x") is None


def test_reset_prefix_cache_forgets_every_hash_but_keeps_ref_counts():
    pool = BlockPool(3, enable_prefix_caching=True)
    a, b, _ = pool.allocate(3)
    pool.cache(a, b"a")
    pool.cache(b, b"b")
    pool.free([b])
    pool.reset_prefix_cache()
    assert pool.cached_blocks == {}
    assert a.block_hash is None and b.block_hash is None
    assert [x.ref_count for x in pool.blocks] == [1, 0, 1]
    assert pool.free_queue.block_ids() == [1]
    check_pool(pool)


def test_chained_hash_depends_on_the_parent():
    tokens = [1, 2, 3, 4]
    assert hash_block(ROOT_HASH, tokens) == hash_block(ROOT_HASH, list(tokens))
    assert hash_block(ROOT_HASH, tokens) != hash_block(hash_block(ROOT_HASH, [9, 9, 9, 9]), tokens)
    assert hash_block(ROOT_HASH, [1, 2, 3, 4]) != hash_block(ROOT_HASH, [1, 2, 4, 3])


def test_extend_block_hashes_hashes_only_new_full_blocks():
    hashes: list[bytes] = []
    extend_block_hashes(hashes, [1, 2, 3], block_size=2)
    assert hashes == [hash_block(ROOT_HASH, [1, 2])]
    extend_block_hashes(hashes, [1, 2, 3], block_size=2)  # nothing new
    assert len(hashes) == 1
    extend_block_hashes(hashes, [1, 2, 3, 4, 5], block_size=2)
    assert hashes == [hash_block(ROOT_HASH, [1, 2]), hash_block(hash_block(ROOT_HASH, [1, 2]), [3, 4])]


def test_a_cache_salt_changes_the_first_hash_and_so_the_whole_chain():
    tokens = [1, 2, 3, 4, 5, 6]
    plain, salted, same_salt, other_salt = [], [], [], []
    extend_block_hashes(plain, tokens, block_size=2)
    extend_block_hashes(salted, tokens, block_size=2, cache_salt="tenant-a")
    extend_block_hashes(same_salt, tokens, block_size=2, cache_salt="tenant-a")
    extend_block_hashes(other_salt, tokens, block_size=2, cache_salt="tenant-b")
    assert salted == same_salt
    assert salted[0] == hash_block(ROOT_HASH, [1, 2], "tenant-a")
    # Only the first block takes the salt; the rest are chained on it.
    assert salted[1:] == [hash_block(salted[0], [3, 4]), hash_block(salted[1], [5, 6])]
    assert not set(salted) & set(plain) and not set(salted) & set(other_salt) and not set(plain) & set(other_salt)
