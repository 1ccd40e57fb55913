"""What attention needs to know about one flat batch.

Tokens of all scheduled requests are concatenated: request i owns query rows
query_start_loc[i]:query_start_loc[i+1]. Its context (cached + new tokens) has
seq_lens[i] tokens, read through block_table[i]. slot_mapping[t] is the KV
slot (block_id * block_size + offset) where token t's K/V is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_table: torch.Tensor  # [B, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64
    # Host copies for kernels that loop or branch on lengths without a device sync.
    query_start_np: np.ndarray  # [B + 1]
    query_lens_np: np.ndarray  # [B]
    seq_lens_np: np.ndarray  # [B]
    block_size: int
    # What a backend derives from the fields above once per step and reuses in every
    # layer (the CPU kernels' index arrays, as C pointers), keyed by backend.
    backend_state: dict = field(default_factory=dict, repr=False)

    @property
    def num_requests(self) -> int:
        return len(self.seq_lens_np)

    @property
    def max_query_len(self) -> int:
        return int(self.query_lens_np.max()) if len(self.query_lens_np) else 0

    @property
    def max_seq_len(self) -> int:
        return int(self.seq_lens_np.max()) if len(self.seq_lens_np) else 0

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1
