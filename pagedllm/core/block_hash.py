"""Chained content hash of a full KV block.

A block's hash covers its parent's hash and its own token ids, so equal hashes
mean equal whole prefixes, not just equal blocks. SHA-256 makes an accidental
collision (which would silently serve wrong K/V) practically impossible; it
costs about a microsecond per block.
"""

from __future__ import annotations

import hashlib
from array import array

BlockHash = bytes

# The hash chain of a request starts from this root (a prefix of nothing).
ROOT_HASH: BlockHash = b""


def hash_block(parent_hash: BlockHash, token_ids: list[int]) -> BlockHash:
    """Hash of one full block given its parent's hash. token_ids: block_size ids."""
    digest = hashlib.sha256(parent_hash)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def extend_block_hashes(block_hashes: list[BlockHash], token_ids: list[int], block_size: int) -> None:
    """Append the hashes of every full block of `token_ids` not hashed yet."""
    num_full_blocks = len(token_ids) // block_size
    for index in range(len(block_hashes), num_full_blocks):
        parent = block_hashes[index - 1] if index else ROOT_HASH
        start = index * block_size
        block_hashes.append(hash_block(parent, token_ids[start:start + block_size]))
