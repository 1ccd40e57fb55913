"""Triton paged attention: the KV store and one varlen kernel for decodes and
prefill chunks alike. Same API and semantics as `torch_backend` (the baseline
these kernels are tested against).

K/V live in a per-layer pool [2, num_blocks, block_size, num_kv_heads, head_dim]
and are read in place through the block table: key position p of request b is
slot (block_table[b, p // block_size], p % block_size). Nothing is gathered into
contiguous tensors.

Attention layout (as vLLM's unified attention): one program handles one request,
one KV head and a tile of BLOCK_Q query tokens x the G query heads that share that
KV head, packed into BLOCK_M = BLOCK_Q * G (padded) rows, so a decode step of a GQA
model still feeds tl.dot with >= 16 rows. Softmax is online (flash-style) over
BLOCK_N key positions at a time, accumulating in float32.

The pool may hold another dtype than the queries (--kv-cache-dtype): the store
casts to it, the attention kernel casts K/V back to the query dtype as it loads.

Set TRITON_INTERPRET=1 before this module is imported to run it on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.attention.metadata import AttentionMetadata

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------- KV store
@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr,  # [T, Hkv, D]
    cache_ptr,  # [2, num_blocks, block_size, Hkv, D]
    slot_ptr,  # [T] int64
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_c_kv, stride_c_blk, stride_c_off, stride_c_h,
    block_size, num_kv_heads, head_dim,
    HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
):
    """One program per token: copy its [Hkv, D] key and value into its slot."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    block, offset = slot // block_size, slot % block_size
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, DIM_PAD)[None, :]
    mask = (h < num_kv_heads) & (d < head_dim)
    k = tl.load(key_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    dst = cache_ptr + block * stride_c_blk + offset * stride_c_off + h * stride_c_h + d
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_c_kv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """key/value [T, Hkv, D] -> their slots in kv_cache (cast to the cache dtype)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    key, value = _last_dim_contiguous(key), _last_dim_contiguous(value)
    _check_cache(kv_cache, num_kv_heads, head_dim)
    _write_kv_kernel[(num_tokens,)](
        key, value, kv_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        kv_cache.shape[2], num_kv_heads, head_dim,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads), DIM_PAD=triton.next_power_of_2(head_dim),
    )


# -------------------------------------------------------------------- attention
@triton.jit
def _paged_attention_kernel(
    q_ptr, out_ptr,  # [T, H, D]
    cache_ptr,  # [2, num_blocks, block_size, Hkv, D]
    block_table_ptr,  # [B, max_blocks] int32
    query_start_ptr,  # [B + 1] int32
    seq_lens_ptr,  # [B] int32
    alibi_ptr,  # [H] float32 (dummy when not USE_ALIBI)
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_c_kv, stride_c_blk, stride_c_off, stride_c_h,
    stride_bt,
    scale, soft_cap, window,
    block_size, head_dim,
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_Q: tl.constexpr,  # query tokens per program
    BLOCK_M: tl.constexpr,  # rows = next_pow2(BLOCK_Q * GROUP), >= 16
    BLOCK_N: tl.constexpr,  # key positions per inner step
    DIM_PAD: tl.constexpr,  # next_pow2(head_dim), >= 16
    USE_WINDOW: tl.constexpr, USE_ALIBI: tl.constexpr, USE_SOFT_CAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    req = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2)

    q_begin = tl.load(query_start_ptr + req)
    query_len = tl.load(query_start_ptr + req + 1) - q_begin
    if q_tile * BLOCK_Q >= query_len:  # grid covers the longest request
        return
    seq_len = tl.load(seq_lens_ptr + req)
    context_start = seq_len - query_len  # position of this request's first query

    # Rows: r -> (query token q_tile*BLOCK_Q + r // GROUP, head kv_head*GROUP + r % GROUP).
    rows = tl.arange(0, BLOCK_M)
    q_idx = q_tile * BLOCK_Q + rows // GROUP  # [M] index among this request's queries
    head = kv_head * GROUP + rows % GROUP  # [M]
    row_valid = (rows < BLOCK_Q * GROUP) & (q_idx < query_len)
    q_pos = context_start + q_idx  # [M] absolute position
    dims = tl.arange(0, DIM_PAD)
    dim_valid = dims < head_dim

    q_offsets = (q_begin + q_idx).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
    io_mask = row_valid[:, None] & dim_valid[None, :]
    q = tl.load(q_ptr + q_offsets, mask=io_mask, other=0.0)  # [M, DIM_PAD]
    if USE_ALIBI:
        slope = tl.load(alibi_ptr + head, mask=row_valid, other=0.0).to(tl.float32)  # [M]

    # Key range this tile can see: causal end, and the window's start.
    last_q_pos = context_start + tl.minimum((q_tile + 1) * BLOCK_Q, query_len) - 1
    kv_end = last_q_pos + 1
    kv_begin = 0
    if USE_WINDOW:
        first_q_pos = context_start + q_tile * BLOCK_Q
        kv_begin = tl.maximum(first_q_pos - window + 1, 0) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp
    acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
    k_base = cache_ptr + kv_head * stride_c_h
    for n_start in range(kv_begin, kv_end, BLOCK_N):
        k_pos = n_start + tl.arange(0, BLOCK_N)  # [N]
        k_valid = k_pos < kv_end
        block_id = tl.load(block_table_ptr + req * stride_bt + k_pos // block_size, mask=k_valid, other=0)
        slot_offsets = block_id.to(tl.int64) * stride_c_blk + (k_pos % block_size) * stride_c_off  # [N]
        k = tl.load(k_base + slot_offsets[None, :] + dims[:, None],
                    mask=dim_valid[:, None] & k_valid[None, :], other=0.0).to(q.dtype)  # [DIM_PAD, N] (K^T)
        v = tl.load(k_base + stride_c_kv + slot_offsets[:, None] + dims[None, :],
                    mask=k_valid[:, None] & dim_valid[None, :], other=0.0).to(q.dtype)  # [N, DIM_PAD]

        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale  # [M, N] float32
        if USE_SOFT_CAP:  # cap * tanh(s / cap), tanh(x) = 1 - 2 / (exp(2x) + 1)
            s = soft_cap * (1.0 - 2.0 / (tl.exp(2.0 * s / soft_cap) + 1.0))
        if USE_ALIBI:
            s += slope[:, None] * (k_pos[None, :] - q_pos[:, None]).to(tl.float32)
        allowed = row_valid[:, None] & k_valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            allowed = allowed & (q_pos[:, None] - k_pos[None, :] < window)
        s = tl.where(allowed, s, float("-inf"))

        # Online softmax; a row with nothing allowed so far keeps max -inf, so
        # exponentiate against 0 instead to avoid (-inf) - (-inf).
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_offsets = (q_begin + q_idx).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + o_offsets, out, mask=io_mask)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                    sliding_window: int | None = None, alibi_slopes: torch.Tensor | None = None,
                    logits_soft_cap: float | None = None) -> torch.Tensor:
    """query [T, H, D] (K/V of these tokens already written) -> output [T, H, D].
    One launch for the whole batch: grid (requests, query tiles, KV heads)."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = kv_cache.shape[3]
    _check_cache(kv_cache, num_kv_heads, head_dim)
    if query.dtype not in _DTYPES or kv_cache.dtype not in _DTYPES:
        raise TypeError(f"triton paged_attention needs query and kv_cache dtypes in {_DTYPES}, "
                        f"got {query.dtype} and {kv_cache.dtype}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    output = torch.empty_like(query)
    num_requests, max_query_len = metadata.num_requests, metadata.max_query_len
    if num_tokens == 0 or num_requests == 0:
        return output
    query = _last_dim_contiguous(query)
    block_table = _last_dim_contiguous(metadata.block_table)
    group = num_heads // num_kv_heads
    block_m, block_q, block_n = _tile_sizes(group, max_query_len, head_dim)
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.to(device=query.device, dtype=torch.float32).contiguous()
    grid = (num_requests, triton.cdiv(max_query_len, block_q), num_kv_heads)
    _paged_attention_kernel[grid](
        query, output, kv_cache, block_table, metadata.query_start_loc, metadata.seq_lens,
        alibi_slopes if alibi_slopes is not None else query,
        query.stride(0), query.stride(1), output.stride(0), output.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_table.stride(0),
        float(scale), float(logits_soft_cap or 1.0), int(sliding_window or 1),
        kv_cache.shape[2], head_dim,
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n,
        DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        USE_WINDOW=sliding_window is not None, USE_ALIBI=alibi_slopes is not None,
        USE_SOFT_CAP=logits_soft_cap is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
    )
    return output


def _tile_sizes(group: int, max_query_len: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_Q query tokens per program, BLOCK_N keys per step).
    Decode-only batches use the smallest row tile that holds one token's heads."""
    rows_wanted = group if max_query_len == 1 else max(64, group)
    block_m = max(16, triton.next_power_of_2(rows_wanted))
    block_n = 32 if head_dim > 128 else 64
    return block_m, block_m // group, block_n


def _check_cache(kv_cache: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[3:] != (num_kv_heads, head_dim):
        raise ValueError(f"kv_cache must be [2, num_blocks, block_size, {num_kv_heads}, {head_dim}], "
                         f"got {tuple(kv_cache.shape)}")
    if kv_cache.stride(4) != 1:
        raise ValueError("kv_cache must be contiguous in head_dim")
    if head_dim > 512:
        raise ValueError(f"triton paged attention supports head_dim <= 512, got {head_dim}")


def _last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()
