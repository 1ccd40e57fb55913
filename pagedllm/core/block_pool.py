"""Physical KV blocks: reference counts, the free queue and the prefix-cache map.

A free block may still hold the K/V of a cached prefix ("free memory that
remembers"): it keeps its hash until it is handed out again. The free queue is
LRU: blocks freed long ago are reused first, and a prefix-cache hit pulls a
block out of the middle of the queue in O(1).
"""

from __future__ import annotations

from pagedllm.core.block_hash import BlockHash


class Block:
    """One physical block of `block_size` token slots."""

    __slots__ = ("block_id", "ref_count", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        # Set while the block is registered in the prefix cache (full blocks only).
        self.block_hash: BlockHash | None = None
        # Links of the doubly linked free queue; None when not queued.
        self.prev_free: Block | None = None
        self.next_free: Block | None = None

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_count})"


class FreeBlockQueue:
    """Doubly linked list of free blocks: pop the oldest, append, remove any in O(1)."""

    def __init__(self, blocks: list[Block]) -> None:
        # Sentinels make every removal the same two pointer updates.
        self._head = Block(-1)
        self._tail = Block(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def append(self, block: Block) -> None:
        last = self._tail.prev_free
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free_blocks += 1

    def remove(self, block: Block) -> None:
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def pop_oldest(self) -> Block:
        block = self._head.next_free
        if block is self._tail:
            raise RuntimeError("no free KV block left")
        self.remove(block)
        return block

    def block_ids(self) -> list[int]:
        """Free block ids from oldest to newest (for tests and debugging)."""
        ids, block = [], self._head.next_free
        while block is not self._tail:
            ids.append(block.block_id)
            block = block.next_free
        return ids


class BlockPool:
    """All physical blocks of the KV pool and the hash -> block prefix cache."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least 1 block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(block_id) for block_id in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached_blocks: dict[BlockHash, Block] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free_blocks

    @property
    def usage(self) -> float:
        """Share of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self, num_blocks: int) -> list[Block]:
        """Take `num_blocks` fresh blocks (ref count 1), evicting their old cache entries."""
        if num_blocks > self.num_free_blocks:
            raise RuntimeError(f"asked for {num_blocks} KV blocks, {self.num_free_blocks} free")
        blocks = []
        for _ in range(num_blocks):
            block = self.free_queue.pop_oldest()
            self._uncache(block)
            block.ref_count = 1
            blocks.append(block)
        return blocks

    def lookup(self, block_hash: BlockHash) -> Block | None:
        return self.cached_blocks.get(block_hash)

    def share(self, blocks: list[Block]) -> None:
        """Add a reference to each block (a prefix hit); revive free ones."""
        for block in blocks:
            if block.ref_count == 0:
                self.free_queue.remove(block)
            block.ref_count += 1

    def free(self, blocks: list[Block]) -> None:
        """Drop one reference from each block. Pass a request's blocks tail first:
        the tail of a prefix is then evicted before its head."""
        for block in blocks:
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of KV block {block.block_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue.append(block)

    def cache(self, block: Block, block_hash: BlockHash) -> None:
        """Register a full block under its chained hash. If an equal block is
        already cached, keep that one: the new copy stays uncached."""
        if not self.enable_prefix_caching or block.block_hash is not None:
            return
        if block_hash not in self.cached_blocks:
            block.block_hash = block_hash
            self.cached_blocks[block_hash] = block

    def _uncache(self, block: Block) -> None:
        if block.block_hash is not None:
            del self.cached_blocks[block.block_hash]
            block.block_hash = None

    def reset_prefix_cache(self) -> None:
        for block in list(self.cached_blocks.values()):
            self._uncache(block)
