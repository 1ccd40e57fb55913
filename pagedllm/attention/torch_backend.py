"""Reference paged attention in plain PyTorch (CPU and GPU).

K/V live in a per-layer pool [2, num_blocks, block_size, num_kv_heads, head_dim]
and are read only through block tables. The pool may hold another dtype than
the model computes in (--kv-cache-dtype): K/V are cast when written and when
read. This is the correctness baseline every faster kernel is tested against.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pagedllm.attention.metadata import AttentionMetadata


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """key/value [T, Hkv, D] -> their slots in kv_cache (cast to its dtype)."""
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


def _context(kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int, dtype: torch.dtype):
    """The first seq_len K and V of one request in `dtype`: [seq_len, Hkv, D] each (a gather)."""
    num_blocks = -(-seq_len // kv_cache.shape[2])
    blocks = kv_cache[:, block_ids[:num_blocks]].to(dtype)  # [2, nb, bs, Hkv, D]
    flat = blocks.flatten(1, 2)[:, :seq_len]
    return flat[0], flat[1]


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
            sliding_window: int | None, alibi_slopes: torch.Tensor | None,
            logits_soft_cap: float | None) -> torch.Tensor:
    """Causal attention of the last Lq positions of a context of L tokens.
    query [Lq, H, D], key/value [L, Hkv, D] -> [Lq, H, D]."""
    num_queries, num_heads, head_dim = query.shape
    context_len, num_kv_heads = key.shape[0], key.shape[1]
    start = context_len - num_queries
    q_pos = torch.arange(start, context_len, device=query.device).unsqueeze(1)  # [Lq, 1]
    k_pos = torch.arange(context_len, device=query.device).unsqueeze(0)  # [1, L]
    allowed = k_pos <= q_pos  # [Lq, L]
    if sliding_window is not None:
        allowed = allowed & (q_pos - k_pos < sliding_window)
    if alibi_slopes is None and logits_soft_cap is None:
        # 4-D inputs: only they reach the fused (flash) CPU kernel, 3-4x faster than
        # the math fallback that 3-D inputs get.
        causal_only = start == 0 and sliding_window is None
        out = F.scaled_dot_product_attention(query.transpose(0, 1)[None], key.transpose(0, 1)[None],
                                             value.transpose(0, 1)[None], attn_mask=None if causal_only else allowed,
                                             is_causal=causal_only, scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1)
    group = num_heads // num_kv_heads
    q = query.view(num_queries, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [Hkv, G, Lq, D]
    k = key.permute(1, 2, 0).unsqueeze(1)  # [Hkv, 1, D, L]
    scores = torch.matmul(q.float(), k.float()) * scale  # [Hkv, G, Lq, L]
    if logits_soft_cap is not None:
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.view(num_kv_heads, group, 1, 1).float()
        scores = scores + slopes * (k_pos - q_pos).float()
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, value.permute(1, 0, 2).unsqueeze(1).float())  # [Hkv, G, Lq, D]
    return out.permute(2, 0, 1, 3).reshape(num_queries, num_heads, head_dim).to(query.dtype)


def _decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                      seq_lens: torch.Tensor, max_seq_len: int, scale: float) -> torch.Tensor:
    """One query token per request, all requests at once.
    query [B, H, D], block_table [B, max_blocks], seq_lens [B] -> [B, H, D]."""
    num_requests, num_heads, head_dim = query.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    num_blocks = -(-max_seq_len // block_size)
    context = kv_cache[:, block_table[:, :num_blocks]].to(query.dtype)  # [2, B, nb, bs, Hkv, D]
    context = context.view(2, num_requests, num_blocks * block_size, num_kv_heads, head_dim)
    keys = context[0].permute(0, 2, 3, 1)  # [B, Hkv, D, L]
    values = context[1].transpose(1, 2)  # [B, Hkv, L, D]
    q = query.view(num_requests, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.matmul(q, keys) * scale  # [B, Hkv, G, L]
    padding = torch.arange(num_blocks * block_size, device=query.device) >= seq_lens.unsqueeze(1)
    scores.masked_fill_(padding[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(values.dtype)
    return torch.matmul(probs, values).view(num_requests, num_heads, head_dim)


def attend_each(output: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                request_indices, scale: float, sliding_window: int | None, alibi_slopes: torch.Tensor | None,
                logits_soft_cap: float | None) -> None:
    """Writes the output rows of the given requests, one request at a time."""
    starts, seq_lens = metadata.query_start_np, metadata.seq_lens_np
    for i in request_indices:
        key, value = _context(kv_cache, metadata.block_table[i], int(seq_lens[i]), query.dtype)
        start, end = starts[i], starts[i + 1]
        output[start:end] = _attend(query[start:end], key, value, scale, sliding_window, alibi_slopes,
                                    logits_soft_cap)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                    sliding_window: int | None = None, alibi_slopes: torch.Tensor | None = None,
                    logits_soft_cap: float | None = None) -> torch.Tensor:
    """query [T, H, D] (K/V of these tokens already written) -> output [T, H, D].
    Without window / ALiBi / soft-cap, single-token (decode) requests are batched
    into one computation; the others run one request at a time."""
    output = torch.empty_like(query)
    query_lens = metadata.query_lens_np
    decodes = np.flatnonzero(query_lens == 1)
    plain = sliding_window is None and alibi_slopes is None and logits_soft_cap is None
    if not plain or len(decodes) < 2:
        attend_each(output, query, kv_cache, metadata, range(len(query_lens)), scale, sliding_window,
                    alibi_slopes, logits_soft_cap)
        return output
    rows = torch.from_numpy(metadata.query_start_np[decodes]).to(query.device)
    index = torch.from_numpy(decodes).to(query.device)
    output[rows] = _decode_attention(query[rows], kv_cache, metadata.block_table[index], metadata.seq_lens[index],
                                     int(metadata.seq_lens_np[decodes].max()), scale)
    attend_each(output, query, kv_cache, metadata, np.flatnonzero(query_lens != 1), scale, None, None, None)
    return output
