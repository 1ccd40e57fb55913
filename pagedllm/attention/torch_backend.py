"""Reference paged attention in plain PyTorch (CPU and GPU).

K/V live in a per-layer pool [2, num_blocks, block_size, num_kv_heads, head_dim]
and are read only through block tables. This is the correctness baseline every
faster kernel is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm.attention.metadata import AttentionMetadata


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """key/value [T, Hkv, D] -> their slots in kv_cache."""
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def _context(kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int):
    """The first seq_len K and V of one request: [seq_len, Hkv, D] each (a gather)."""
    num_blocks = -(-seq_len // kv_cache.shape[2])
    blocks = kv_cache[:, block_ids[:num_blocks]]  # [2, nb, bs, Hkv, D]
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
    plain = sliding_window is None and alibi_slopes is None and logits_soft_cap is None
    if plain and start == 0:
        out = F.scaled_dot_product_attention(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                                             is_causal=True, scale=scale, enable_gqa=True)
        return out.transpose(0, 1)
    group = num_heads // num_kv_heads
    q = query.view(num_queries, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [Hkv, G, Lq, D]
    k = key.permute(1, 2, 0).unsqueeze(1)  # [Hkv, 1, D, L]
    scores = torch.matmul(q.float(), k.float()) * scale  # [Hkv, G, Lq, L]
    if logits_soft_cap is not None:
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    q_pos = torch.arange(start, context_len, device=query.device).unsqueeze(1)  # [Lq, 1]
    k_pos = torch.arange(context_len, device=query.device).unsqueeze(0)  # [1, L]
    if alibi_slopes is not None:
        slopes = alibi_slopes.view(num_kv_heads, group, 1, 1).float()
        scores = scores + slopes * (k_pos - q_pos).float()
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (q_pos - k_pos < sliding_window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, value.permute(1, 0, 2).unsqueeze(1).float())  # [Hkv, G, Lq, D]
    return out.permute(2, 0, 1, 3).reshape(num_queries, num_heads, head_dim).to(query.dtype)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                    sliding_window: int | None = None, alibi_slopes: torch.Tensor | None = None,
                    logits_soft_cap: float | None = None) -> torch.Tensor:
    """query [T, H, D] (K/V of these tokens already written) -> output [T, H, D]."""
    output = torch.empty_like(query)
    start = 0
    for i, (query_len, seq_len) in enumerate(zip(metadata.query_lens_np.tolist(), metadata.seq_lens_np.tolist())):
        key, value = _context(kv_cache, metadata.block_table[i], seq_len)
        end = start + query_len
        output[start:end] = _attend(query[start:end], key, value, scale, sliding_window, alibi_slopes,
                                    logits_soft_cap)
        start = end
    return output
