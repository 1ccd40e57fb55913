"""Per-request block tables on top of the block pool.

The scheduler talks to this class only: look up a request's cached prefix,
allocate slots for the tokens a step will compute (an `Allocation`, or `None`
when the pool is full), register newly full blocks in the prefix cache, and free.
Blocks are shared only through the prefix cache, and only full ones, so a request
never writes into a block another request reads: there is no copy-on-write.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedllm.core.block_hash import extend_block_hashes
from pagedllm.core.block_pool import Block, BlockPool
from pagedllm.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Allocation:
    """How a request's block table changed: entries from `first_changed_index`
    on are now `block_ids`."""

    first_changed_index: int
    block_ids: list[int]


@dataclass
class RequestBlocks:
    """One request's blocks, in table order."""

    blocks: list[Block] = field(default_factory=list)
    # How many leading blocks are registered in the prefix cache.
    num_cached: int = 0
    # How many leading blocks were given back as out of the sliding window. Their ids
    # stay in the block table (never read: attention masks them).
    num_released: int = 0


@dataclass
class PrefixCacheStats:
    num_queried_tokens: int = 0
    num_hit_tokens: int = 0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Set when every attention layer sees only this many recent tokens: blocks
        # wholly before the window go back to the pool while the request runs.
        self.sliding_window = sliding_window
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.requests: dict[str, RequestBlocks] = {}
        self.prefix_cache_stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_ids(self, request_id: str) -> list[int]:
        held = self.requests.get(request_id)
        return [block.block_id for block in held.blocks] if held else []

    def get_computed_blocks(self, request: Request) -> list[Block]:
        """The longest cached prefix of the request, in whole blocks. At least one
        token is always left to compute, since the step must produce logits.
        Requests that want prompt logprobs compute their whole prompt."""
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return []
        extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size, request.cache_salt)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        self.prefix_cache_stats.num_queried_tokens += request.num_tokens
        self.prefix_cache_stats.num_hit_tokens += len(hits) * self.block_size
        return hits

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[Block] | None = None) -> Allocation | None:
        """Make room for `num_new_tokens` more tokens after the request's computed
        ones (plus `computed_blocks`, a prefix hit for a request being admitted).
        Atomic: returns None and changes nothing when the pool is too small."""
        computed_blocks = computed_blocks or []
        held = self.requests.get(request.request_id) or RequestBlocks()
        blocks = held.blocks
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        num_blocks_after = cdiv(num_computed + num_new_tokens, self.block_size)
        num_fresh = max(0, num_blocks_after - len(blocks) - len(computed_blocks))
        num_revived = sum(1 for block in computed_blocks if block.ref_count == 0)
        if num_fresh > self.pool.num_free_blocks - num_revived:
            return None

        first_changed_index = len(blocks)
        self.pool.share(computed_blocks)
        blocks.extend(computed_blocks)
        blocks.extend(self.pool.allocate(num_fresh))
        self.requests[request.request_id] = held
        return Allocation(first_changed_index, [b.block_id for b in blocks[first_changed_index:]])

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that are full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        held = self.requests[request.request_id]
        num_full = request.num_computed_tokens // self.block_size
        # Never blocks given back as out of the window: they may hold another
        # request's tokens by now.
        start = max(held.num_cached, held.num_released)
        if num_full <= start:
            return
        extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size, request.cache_salt)
        for index in range(start, num_full):
            self.pool.cache(held.blocks[index], request.block_hashes[index])
        held.num_cached = num_full

    def release_out_of_window_blocks(self, request: Request) -> None:
        """Give back the blocks no future query can attend to: the next query is at
        position num_computed_tokens and sees keys after it minus the window."""
        held = self.requests.get(request.request_id)
        if not self.sliding_window or held is None:
            return
        num_unneeded = max(0, request.num_computed_tokens - self.sliding_window + 1) // self.block_size
        if num_unneeded > held.num_released:
            self.pool.free(list(reversed(held.blocks[held.num_released:num_unneeded])))
            held.num_released = num_unneeded

    def free(self, request: Request) -> None:
        held = self.requests.pop(request.request_id, None)
        if held is not None:
            self.pool.free(list(reversed(held.blocks[held.num_released:])))

    def num_unfilled_slots(self, requests: list[Request]) -> int:
        """Allocated slots that hold no computed token (internal fragmentation)."""
        return sum(len(self.requests[r.request_id].blocks) * self.block_size - r.num_computed_tokens
                   for r in requests if r.request_id in self.requests)

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
