"""The data-parallel router's choices: a shared prefix follows its replica, a busy
replica sheds load past the imbalance bound, salts and capacity are respected,
round-robin ignores prefixes."""

from __future__ import annotations

import pytest

from pagedllm.core.block_hash import extend_block_hashes
from pagedllm.engine.dp_router import MAX_IMBALANCE, DataParallelRouter

BLOCK = 4
SYSTEM_A = list(range(100, 132))  # 8 blocks
SYSTEM_B = list(range(200, 232))


def prompt(system: list[int], user: int) -> list[int]:
    return system + [user, user + 1, user + 2]


def test_requests_sharing_a_prefix_go_where_it_is_cached():
    router = DataParallelRouter([1000, 1000], BLOCK)
    first_a = router.route(prompt(SYSTEM_A, 1))
    first_b = router.route(prompt(SYSTEM_B, 1))
    assert {first_a, first_b} == {0, 1}  # nothing cached yet: the least loaded replica
    for user in range(2, 8):
        assert router.route(prompt(SYSTEM_A, user)) == first_a
        assert router.route(prompt(SYSTEM_B, user)) == first_b
    assert [replica.in_flight for replica in router.replicas] == [7, 7]


def test_a_busy_replica_sheds_load_past_the_imbalance_bound():
    router = DataParallelRouter([1000, 1000], BLOCK)
    home = router.route(prompt(SYSTEM_A, 0))
    choices = [router.route(prompt(SYSTEM_A, user)) for user in range(1, MAX_IMBALANCE + 4)]
    # The prefix's replica takes requests until it has MAX_IMBALANCE more in flight than the other.
    assert choices[:MAX_IMBALANCE] == [home] * MAX_IMBALANCE
    assert choices[MAX_IMBALANCE] == 1 - home
    router.finished(home, MAX_IMBALANCE + 1)  # its requests finish: the prefix goes home again
    assert router.route(prompt(SYSTEM_A, 99)) == home


def test_prompts_without_a_cached_prefix_balance_the_load():
    router = DataParallelRouter([1000, 1000, 1000], BLOCK)
    choices = [router.route([user] * 3) for user in range(6)]  # shorter than a block: no prefix at all
    assert sorted(choices) == [0, 0, 1, 1, 2, 2]


def test_a_salted_prompt_shares_no_prefix_with_other_salts():
    router = DataParallelRouter([1000, 1000], BLOCK)
    home = router.route(prompt(SYSTEM_A, 0), cache_salt="tenant-1")
    assert router.route(prompt(SYSTEM_A, 1), cache_salt="tenant-2") != home
    assert router.route(prompt(SYSTEM_A, 2), cache_salt="tenant-1") == home


def test_a_replica_remembers_no_more_blocks_than_its_cache_holds():
    router = DataParallelRouter([8, 8], BLOCK)
    home = router.route(prompt(SYSTEM_A, 0))
    system_a_blocks: list = []
    extend_block_hashes(system_a_blocks, SYSTEM_A, BLOCK)
    assert router.replicas[home].matched_blocks(system_a_blocks) == 8
    # Another 8-block prefix on the same replica evicts A from what the router remembers of it.
    router.replicas[1 - home].in_flight = 5  # A's replica is the least loaded: it takes the new prefix
    assert router.route(prompt(list(range(300, 332)), 0)) == home
    assert len(router.replicas[home].blocks) == 8
    assert router.replicas[home].matched_blocks(system_a_blocks) == 0


def test_parallel_samples_count_as_load():
    router = DataParallelRouter([1000, 1000], BLOCK)
    first = router.route([1, 2], num_requests=4)
    assert router.replicas[first].in_flight == 4
    assert router.route([3, 4]) == 1 - first


def test_round_robin_ignores_prefixes():
    router = DataParallelRouter([1000, 1000], BLOCK, policy="round_robin")
    assert [router.route(prompt(SYSTEM_A, user)) for user in range(4)] == [0, 1, 0, 1]


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="prefix, round_robin"):
        DataParallelRouter([10], BLOCK, policy="random")
