"""Which data-parallel replica (engine core) gets a request.

Each replica has its own prefix cache, so a request sent where its prefix (a system
prompt, the earlier turns of a conversation) is already cached skips recomputing it,
while a plain load balancer scatters such requests and computes the prefix once per
replica. The router cannot see the replicas' caches; like SGLang's cache-aware router
it keeps an approximation: per replica, the chained block hashes (core/block_hash.py,
the same chain the replica's cache is keyed by) of the prompts it was sent, least
recently used first out, at most as many as that replica's KV pool has blocks.

Policy "prefix" (the default): a request goes to the replica whose remembered blocks
cover the longest prefix of its prompt, unless that replica has more than
MAX_IMBALANCE requests in flight beyond the least loaded replica (then, and when no
replica has any of its prefix, to the least loaded one; ties go round-robin).
Policy "round_robin" is the plain load balancer, kept for comparison.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

from pagedllm.core.block_hash import BlockHash, extend_block_hashes

ROUTING_POLICIES = ("prefix", "round_robin")
# In-flight requests a replica may have beyond the least loaded one and still get a
# request for its cached prefix: past it, the queueing delay outweighs the prefill saved.
MAX_IMBALANCE = 8


@dataclass
class ReplicaLoad:
    """What the router knows of one replica."""

    capacity_blocks: int  # its KV pool size: it cannot cache more
    in_flight: int = 0  # requests routed there and not finished
    routed: int = 0  # requests routed there in all
    # Chained hashes of the prompt blocks routed there, least recently used first.
    blocks: OrderedDict[BlockHash, None] = field(default_factory=OrderedDict)

    def matched_blocks(self, block_hashes: list[BlockHash]) -> int:
        """How many leading blocks of the chain this replica probably holds."""
        for count, block_hash in enumerate(block_hashes):
            if block_hash not in self.blocks:
                return count
        return len(block_hashes)

    def remember(self, block_hashes: list[BlockHash]) -> None:
        for block_hash in block_hashes:
            self.blocks[block_hash] = None
            self.blocks.move_to_end(block_hash)
        while len(self.blocks) > self.capacity_blocks:
            self.blocks.popitem(last=False)


class DataParallelRouter:
    def __init__(self, capacity_blocks: list[int], block_size: int, policy: str = "prefix") -> None:
        """capacity_blocks: each replica's KV pool size in blocks (one entry per replica)."""
        if policy not in ROUTING_POLICIES:
            raise ValueError(f"data-parallel routing policy must be one of {', '.join(ROUTING_POLICIES)}, "
                             f"got {policy!r}")
        self.replicas = [ReplicaLoad(capacity) for capacity in capacity_blocks]
        self.block_size = block_size
        self.policy = policy
        self._turn = itertools.count()

    def route(self, prompt_token_ids: list[int], cache_salt: str | None = None, num_requests: int = 1) -> int:
        """The replica for a prompt (num_requests: its parallel samples, which share it)."""
        replicas = self.replicas
        if len(replicas) == 1:
            chosen = 0
        elif self.policy == "round_robin":
            chosen = next(self._turn) % len(replicas)
        else:
            block_hashes: list[BlockHash] = []
            # The last prompt token is always recomputed (its logits are needed), so a
            # block ending there is never a hit: hash only the blocks before it.
            extend_block_hashes(block_hashes, prompt_token_ids[:-1], self.block_size, cache_salt)
            chosen = self._choose(block_hashes)
            replicas[chosen].remember(block_hashes)
        replica = replicas[chosen]
        replica.in_flight += num_requests
        replica.routed += num_requests
        return chosen

    def _choose(self, block_hashes: list[BlockHash]) -> int:
        least_load = min(replica.in_flight for replica in self.replicas)
        matches = [replica.matched_blocks(block_hashes) for replica in self.replicas]
        best = max(matches)
        if best:
            candidates = [index for index, replica in enumerate(self.replicas)
                          if matches[index] == best and replica.in_flight - least_load <= MAX_IMBALANCE]
            if candidates:
                return min(candidates, key=lambda index: self.replicas[index].in_flight)
        least_loaded = [index for index, replica in enumerate(self.replicas) if replica.in_flight == least_load]
        return least_loaded[next(self._turn) % len(least_loaded)]

    def finished(self, replica: int, num_requests: int = 1) -> None:
        self.replicas[replica].in_flight -= num_requests
