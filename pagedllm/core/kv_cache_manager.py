"""Per-request block tables on top of the block pool.

The scheduler talks to this class only: look up a request's cached prefix,
allocate slots for the tokens a step will compute (an `Allocation`, or `None`
when the pool is full), register newly full blocks in the prefix cache, fork a
request's blocks to a sibling sample, and free.
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
    on are now `block_ids`; `copies` are (src, dst) block copies that must run
    before the step writes K/V (copy-on-write of a shared partial block)."""

    first_changed_index: int
    block_ids: list[int]
    copies: list[tuple[int, int]] = field(default_factory=list)


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
        self.req_to_blocks: dict[str, list[Block]] = {}
        # How many leading blocks of each request are registered in the prefix cache.
        self._num_cached_blocks: dict[str, int] = {}
        # How many leading blocks of each request were given back as out of the window.
        # Their ids stay in the block table (never read: attention masks them).
        self._num_released_blocks: dict[str, int] = {}
        self.prefix_cache_stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self.req_to_blocks.get(request_id, ())]

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
        blocks = self.req_to_blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        num_blocks_after = cdiv(num_computed + num_new_tokens, self.block_size)
        num_fresh = max(0, num_blocks_after - len(blocks) - len(computed_blocks))
        # Writing into a block that another request also holds, or that the prefix cache
        # serves (a fork recomputing the last token of a full block): copy it first.
        needs_copy = (num_new_tokens > 0 and num_computed % self.block_size != 0
                      and not computed_blocks
                      and (blocks[-1].ref_count > 1 or blocks[-1].block_hash is not None))
        num_revived = sum(1 for block in computed_blocks if block.ref_count == 0)
        if num_fresh + needs_copy > self.pool.num_free_blocks - num_revived:
            return None

        first_changed_index = len(blocks)
        self.pool.share(computed_blocks)
        blocks.extend(computed_blocks)
        copies = []
        if needs_copy:
            [copy] = self.pool.allocate(1)
            copies.append((blocks[-1].block_id, copy.block_id))
            self.pool.free([blocks[-1]])
            blocks[-1] = copy
            first_changed_index = len(blocks) - 1
        blocks.extend(self.pool.allocate(num_fresh))
        self.req_to_blocks[request.request_id] = blocks
        return Allocation(first_changed_index, [b.block_id for b in blocks[first_changed_index:]], copies)

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that are full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        blocks = self.req_to_blocks[request.request_id]
        num_full = request.num_computed_tokens // self.block_size
        # Never blocks given back as out of the window (a fork's table starts with
        # its source's): they may hold another request's tokens by now.
        start = max(self._num_cached_blocks.get(request.request_id, 0),
                    self._num_released_blocks.get(request.request_id, 0))
        if num_full <= start:
            return
        extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size, request.cache_salt)
        for index in range(start, num_full):
            self.pool.cache(blocks[index], request.block_hashes[index])
        self._num_cached_blocks[request.request_id] = num_full

    def fork(self, source: Request, child: Request, num_tokens: int) -> None:
        """Give `child` the source's blocks holding its first `num_tokens` tokens
        (shared by reference count; a partial last block is copied on write)."""
        shared = self.req_to_blocks[source.request_id][:cdiv(num_tokens, self.block_size)]
        # Blocks the source gave back as out of its window stay given back for the child.
        num_released = min(self._num_released_blocks.get(source.request_id, 0), len(shared))
        self.pool.share(shared[num_released:])
        self.req_to_blocks[child.request_id] = list(shared)
        if num_released:
            self._num_released_blocks[child.request_id] = num_released

    def release_out_of_window_blocks(self, request: Request) -> None:
        """Give back the blocks no future query can attend to: the next query is at
        position num_computed_tokens and sees keys after it minus the window."""
        blocks = self.req_to_blocks.get(request.request_id)
        if not self.sliding_window or blocks is None:
            return
        num_unneeded = max(0, request.num_computed_tokens - self.sliding_window + 1) // self.block_size
        start = self._num_released_blocks.get(request.request_id, 0)
        if num_unneeded > start:
            self.pool.free(list(reversed(blocks[start:num_unneeded])))
            self._num_released_blocks[request.request_id] = num_unneeded

    def free(self, request: Request) -> None:
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self._num_cached_blocks.pop(request.request_id, None)
        num_released = self._num_released_blocks.pop(request.request_id, 0)
        self.pool.free(list(reversed(blocks[num_released:])))

    def num_unfilled_slots(self, requests: list[Request]) -> int:
        """Allocated slots that hold no computed token (internal fragmentation)."""
        return sum(len(self.req_to_blocks.get(r.request_id, ())) * self.block_size - r.num_computed_tokens
                   for r in requests if r.request_id in self.req_to_blocks)

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
