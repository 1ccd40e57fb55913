"""Chained content hash of a full KV block.

A block's hash covers its parent's hash and its own token ids, so equal hashes
mean equal whole prefixes, not just equal blocks. SHA-256 makes an accidental
collision (which would silently serve wrong K/V) practically impossible; it
costs about a microsecond per block.

A request's optional cache salt goes into its first block's hash, so the whole
chain of a salted request differs from that of unsalted or differently salted
requests with the same tokens: tenants with different salts share no blocks.
"""

from __future__ import annotations

import hashlib
from array import array

BlockHash = bytes

# The hash chain of a request starts from this root (a prefix of nothing).
ROOT_HASH: BlockHash = b""


def hash_block(parent_hash: BlockHash, token_ids: list[int], cache_salt: str | None = None) -> BlockHash:
    """Hash of one full block given its parent's hash. token_ids: block_size ids;
    cache_salt: the request's salt, for its first block only."""
    digest = hashlib.sha256(parent_hash)
    digest.update(array("q", token_ids).tobytes())
    if cache_salt is not None:
        # The token bytes have a fixed length (block_size ids), so a salted block's bytes
        # never equal an unsalted one's.
        digest.update(b"salt:" + cache_salt.encode())
    return digest.digest()


def extend_block_hashes(block_hashes: list[BlockHash], token_ids: list[int], block_size: int,
                        cache_salt: str | None = None) -> None:
    """Append the hashes of every full block of `token_ids` not hashed yet; the
    salt goes into the first block's hash (and so, chained, into every one)."""
    num_full_blocks = len(token_ids) // block_size
    for index in range(len(block_hashes), num_full_blocks):
        parent = block_hashes[index - 1] if index else ROOT_HASH
        start = index * block_size
        block_hashes.append(hash_block(parent, token_ids[start:start + block_size], None if index else cache_salt))
