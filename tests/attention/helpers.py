"""Shared by the attention backend tests: random paged batches and a naive
reference (dense causal softmax per request over its contiguous K/V, float64)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from pagedllm.attention.metadata import AttentionMetadata


@dataclass(frozen=True)
class Case:
    """A batch shape: request i has query_lens[i] new tokens at the end of a
    context of seq_lens[i] tokens (so seq_lens[i] - query_lens[i] are cached)."""
    query_lens: tuple[int, ...]
    seq_lens: tuple[int, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int


CASES = {
    # decodes at / across block boundaries, a chunk after an aligned and an
    # unaligned cached prefix, a fresh prompt; GQA
    "mixed_gqa": Case((1, 1, 1, 5, 7, 19), (1, 16, 33, 21, 30, 19), 4, 2, 32, 16),
    # MHA, a prompt longer than one query tile (64 tokens), small blocks
    "mha_long_prompt": Case((1, 3, 70), (9, 24, 70), 2, 2, 32, 8),
    # 3 query heads per KV head (rows padded), several query tiles, block_size 4
    "group3": Case((45, 1, 2), (50, 13, 8), 6, 2, 16, 4),
    # MQA, contexts over several key steps (64 keys)
    "mqa_long_context": Case((1, 1, 4), (150, 70, 131), 4, 1, 32, 16),
    # head_dim not a power of two, block_size not either
    "dim48": Case((1, 9), (20, 9), 2, 1, 48, 6),
    # decode-only batch
    "decode_only": Case((1, 1, 1, 1), (5, 16, 17, 64), 8, 2, 64, 16),
    # enough decodes for whole-request work items; contexts shorter than a key
    # tile; head_dim 80 (two 32-wide chunks and a remainder)
    "decode_group3_dim80": Case((1, 1, 1, 1, 1, 1), (2, 3, 17, 40, 100, 257), 6, 2, 80, 16),
    # head_dim 128 (the CPU kernel's other unrolled size); contexts over several of its
    # touched-ahead stages (three 32 KiB blocks each here), a single-token context
    "decode_dim128_stages": Case((1, 1, 1, 1, 1), (300, 47, 129, 1, 16), 8, 2, 128, 16),
    # 4 and 5 query heads per KV head (the kernel computes 2 + 2 and 3 + 2 heads
    # together); head_dim 40, an odd number of 8-wide vectors
    "decode_group4_dim40": Case((1, 1, 1, 1, 1), (3, 18, 33, 70, 5), 8, 2, 40, 16),
    "decode_group5_dim24": Case((1, 1, 1, 1), (9, 40, 2, 17), 5, 1, 24, 8),
    # prompt chunks over many query tiles of the CPU prefill kernel (4 tokens x 8 heads
    # each) after cached prefixes, one of them not block-aligned, beside decodes
    "prefill_group8_chunks": Case((1, 37, 90, 1), (30, 100, 90, 2), 16, 2, 64, 16),
}

# name -> paged_attention keyword arguments (alibi_slopes as a flag, made per case)
FEATURES = {
    "plain": {},
    "window7": {"sliding_window": 7},
    "window40": {"sliding_window": 40},
    "alibi": {"alibi_slopes": True},
    "soft_cap": {"logits_soft_cap": 2.0},
    "all": {"sliding_window": 20, "alibi_slopes": True, "logits_soft_cap": 3.0},
}

TOLERANCES = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


@dataclass
class Batch:
    query: torch.Tensor  # [T, H, D]
    new_key: torch.Tensor  # [T, Hkv, D]: K/V of the new tokens, not yet in the pool
    new_value: torch.Tensor
    keys: list[torch.Tensor]  # per request [seq_len, Hkv, D], the whole context
    values: list[torch.Tensor]
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, Hkv, D], cached prefixes stored
    metadata: AttentionMetadata


def make_batch(case: Case, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
               fill: float = float("nan"), spare_blocks: int = 3, kv_dtype: torch.dtype | None = None) -> Batch:
    """Random Q/K/V; shuffled, non-contiguous block ids; unused slots set to `fill`
    (NaN by default, so reading outside a context shows); block tables padded with
    one extra column of block 0. With a kv_dtype the pool holds that dtype, and
    K/V are drawn already rounded to it, so the reference sees what is stored."""
    kv_dtype = kv_dtype or dtype
    gen = torch.Generator().manual_seed(seed)
    qlens, slens = np.array(case.query_lens), np.array(case.seq_lens)
    assert (qlens >= 1).all() and (slens >= qlens).all()
    hkv, dim, bs = case.num_kv_heads, case.head_dim, case.block_size

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    keys = [rand(n, hkv, dim).to(kv_dtype).to(dtype) for n in slens]
    values = [rand(n, hkv, dim).to(kv_dtype).to(dtype) for n in slens]
    query = rand(int(qlens.sum()), case.num_heads, dim)

    blocks_per_request = [-(-int(n) // bs) for n in slens]
    num_blocks = sum(blocks_per_request) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    block_table = torch.zeros(len(slens), max(blocks_per_request) + 1, dtype=torch.int32)
    kv_cache = torch.full((2, num_blocks, bs, hkv, dim), fill, dtype=kv_dtype)
    slots, new_keys, new_values = [], [], []
    for i, (q_len, s_len) in enumerate(zip(qlens.tolist(), slens.tolist())):
        ids = [perm.pop() for _ in range(blocks_per_request[i])]
        block_table[i, :len(ids)] = torch.tensor(ids)
        for pos in range(s_len):
            block, offset = ids[pos // bs], pos % bs
            if pos < s_len - q_len:  # cached prefix: already in the pool
                kv_cache[0, block, offset], kv_cache[1, block, offset] = keys[i][pos], values[i][pos]
            else:
                slots.append(block * bs + offset)
        new_keys.append(keys[i][s_len - q_len:])
        new_values.append(values[i][s_len - q_len:])

    query_start = np.concatenate([[0], np.cumsum(qlens)])
    metadata = AttentionMetadata(
        query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(slens, dtype=torch.int32, device=device),
        block_table=block_table.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_np=query_start, query_lens_np=qlens, seq_lens_np=slens, block_size=bs)
    return Batch(query.to(device), torch.cat(new_keys).to(device), torch.cat(new_values).to(device),
                 [k.to(device) for k in keys], [v.to(device) for v in values], kv_cache.to(device), metadata)


def alibi_slopes(num_heads: int, device: str = "cpu") -> torch.Tensor:
    """Large enough to matter over contexts of a few dozen tokens."""
    return torch.linspace(0.05, 1.0, num_heads, device=device)


def feature_kwargs(name: str, num_heads: int, device: str = "cpu") -> dict:
    kwargs = dict(FEATURES[name])
    if kwargs.get("alibi_slopes"):
        kwargs["alibi_slopes"] = alibi_slopes(num_heads, device)
    return kwargs


def naive_attention(batch: Batch, scale: float, sliding_window: int | None = None,
                    alibi_slopes: torch.Tensor | None = None, logits_soft_cap: float | None = None) -> torch.Tensor:
    """For each request and head, in float64: scores of its queries (the last
    query_len positions) against every key of its contiguous context, soft cap,
    ALiBi, causal and window mask, softmax, weighted sum of values."""
    md = batch.metadata
    outputs = []
    for i, seq_len in enumerate(md.seq_lens_np.tolist()):
        start, end = int(md.query_start_np[i]), int(md.query_start_np[i + 1])
        q = batch.query[start:end].double()
        k, v = batch.keys[i].double(), batch.values[i].double()
        group = q.shape[1] // k.shape[1]
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= q_pos - k_pos < sliding_window
        heads = []
        for h in range(q.shape[1]):
            scores = q[:, h] @ k[:, h // group].T * scale  # [Lq, L]
            if logits_soft_cap is not None:
                scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
            if alibi_slopes is not None:
                scores = scores + float(alibi_slopes[h]) * (k_pos - q_pos)
            scores = scores.masked_fill(~allowed, float("-inf"))
            heads.append(torch.softmax(scores, dim=-1) @ v[:, h // group])  # [Lq, D]
        outputs.append(torch.stack(heads, dim=1))
    return torch.cat(outputs)


def run_backend(backend, batch: Batch, scale: float, **kwargs) -> torch.Tensor:
    """What the Attention layer does: store the new K/V, then attend."""
    backend.write_kv(batch.new_key, batch.new_value, batch.kv_cache, batch.metadata.slot_mapping)
    return backend.paged_attention(batch.query, batch.kv_cache, batch.metadata, scale, **kwargs)


def assert_context_stored(batch: Batch) -> None:
    """Every request's whole context is in the pool, read back through its block table."""
    md, bs = batch.metadata, batch.metadata.block_size
    for i, seq_len in enumerate(md.seq_lens_np.tolist()):
        pos = torch.arange(seq_len)
        blocks = md.block_table[i].cpu().long()[pos // bs]
        stored = batch.kv_cache[:, blocks, pos % bs].cpu().to(batch.query.dtype)  # [2, seq_len, Hkv, D]
        torch.testing.assert_close(stored[0], batch.keys[i].cpu(), rtol=0, atol=0)
        torch.testing.assert_close(stored[1], batch.values[i].cpu(), rtol=0, atol=0)


def check_backend(backend, case: Case, feature: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                  fill: float = float("nan"), seed: int = 0, kv_dtype: torch.dtype | None = None) -> None:
    """The backend's output against the float64 reference, the pool against the
    inputs; kv_dtype: the pool's dtype when it differs from the queries'."""
    batch = make_batch(case, dtype, device, seed=seed, fill=fill, kv_dtype=kv_dtype)
    kwargs = feature_kwargs(feature, case.num_heads, device)
    scale = 1.0 / math.sqrt(case.head_dim)
    out = run_backend(backend, batch, scale, **kwargs)
    assert out.shape == batch.query.shape and out.dtype == dtype
    assert_context_stored(batch)
    expected = naive_attention(batch, scale, **kwargs)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def case_params():
    return [pytest.param(case, id=name) for name, case in CASES.items()]


# 16-bit pools under float32 queries (--kv-cache-dtype with a float32 model)
KV_DTYPES = [pytest.param(torch.float16, id="kv_float16"), pytest.param(torch.bfloat16, id="kv_bfloat16")]
