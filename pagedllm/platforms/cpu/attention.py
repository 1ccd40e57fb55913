"""Paged attention for CPUs: C kernels for decode tokens and for prompt chunks, the
reference torch backend for what they do not cover (a prompt with a sliding window,
ALiBi or a logit soft-cap).

The C kernel (csrc/decode_attention.c, built by platforms/cpu/kernels.py) reads K/V
in place from the blocks; the torch reference must gather each request's
context into new tensors, which dominated decode steps. It computes in float32
from float32, float16 or bfloat16 queries and cache. Without a compiler the torch
backend is used.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from pagedllm.attention import torch_backend
from pagedllm.attention.metadata import AttentionMetadata
from pagedllm.platforms.cpu.kernels import FLOAT, INT64, load_kernel_library, pointer


# The kernels' kv_format numbers (the enum in csrc/kv_elements.h).
KV_FORMATS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# LANES in csrc/prefill_attention.c: the query heads of one KV head it computes together at most.
PREFILL_MAX_GROUP = 32


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """key/value [T, Hkv, D] -> their slots in kv_cache, cast to its dtype (csrc/write_kv.c)."""
    lib = load_kernel_library()
    key, value = key.to(kv_cache.dtype), value.to(kv_cache.dtype)
    dense_rows = all(x.stride(2) == 1 and x.stride(1) == x.shape[2] for x in (key, value))
    if lib is None or not dense_rows or not kv_cache.is_contiguous() or slot_mapping.dtype != torch.int64:
        torch_backend.write_kv(key, value, kv_cache, slot_mapping)
        return
    slots = slot_mapping.contiguous()
    element = kv_cache.element_size()
    lib.write_kv(pointer(kv_cache), pointer(key), pointer(value), pointer(slots), INT64(key.shape[0]),
                 INT64(key.shape[1] * key.shape[2] * element), INT64(key.stride(0) * element),
                 INT64(value.stride(0) * element), INT64(kv_cache.shape[1] * kv_cache.shape[2]))


def decode_attention(output: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                     rows: np.ndarray, table_rows: np.ndarray, seq_lens: np.ndarray, scale: float,
                     sliding_window: int | None, alibi_slopes: torch.Tensor | None,
                     logits_soft_cap: float | None) -> None:
    """Writes output[rows] for single-token queries. query/output [T, H, D] float32;
    kv_cache float32, float16 or bfloat16."""
    lib = load_kernel_library()
    num_heads, head_dim = query.shape[1], query.shape[2]
    _, num_blocks, block_size, num_kv_heads, _ = kv_cache.shape
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    table_rows = np.ascontiguousarray(table_rows, dtype=np.int64)
    seq_lens = np.ascontiguousarray(seq_lens, dtype=np.int64)
    slopes = alibi_slopes.float().contiguous() if alibi_slopes is not None else None
    status = lib.paged_decode_attention(
        pointer(output), pointer(query), pointer(kv_cache), INT64(KV_FORMATS[kv_cache.dtype]), pointer(block_table),
        rows.ctypes.data_as(ctypes.c_void_p), table_rows.ctypes.data_as(ctypes.c_void_p),
        seq_lens.ctypes.data_as(ctypes.c_void_p), INT64(len(rows)), INT64(num_blocks),
        INT64(block_table.shape[1]), INT64(block_size), INT64(num_heads), INT64(num_kv_heads),
        INT64(head_dim), FLOAT(scale), INT64(sliding_window or 0), FLOAT(logits_soft_cap or 0.0),
        pointer(slopes) if slopes is not None else None)
    if status != 0:
        raise MemoryError(f"CPU decode attention: out of memory (or head size {head_dim} not a multiple of 8)")


def prefill_attention(output: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                      q_starts: np.ndarray, q_lens: np.ndarray, table_rows: np.ndarray, seq_lens: np.ndarray,
                      scale: float) -> None:
    """Writes output's rows of multi-token queries (prompt chunks), causal over each
    request's context (csrc/prefill_attention.c). query/output [T, H, D] float32."""
    lib = load_kernel_library()
    num_heads, head_dim = query.shape[1], query.shape[2]
    _, num_blocks, block_size, num_kv_heads, _ = kv_cache.shape
    arrays = [np.ascontiguousarray(a, dtype=np.int64) for a in (q_starts, q_lens, table_rows, seq_lens)]
    status = lib.paged_prefill_attention(
        pointer(output), pointer(query), pointer(kv_cache), INT64(KV_FORMATS[kv_cache.dtype]), pointer(block_table),
        *(a.ctypes.data_as(ctypes.c_void_p) for a in arrays), INT64(len(arrays[0])), INT64(num_blocks),
        INT64(block_table.shape[1]), INT64(block_size), INT64(num_heads), INT64(num_kv_heads), INT64(head_dim),
        FLOAT(scale))
    if status != 0:
        raise MemoryError("CPU prefill attention: out of memory")


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                    sliding_window: int | None = None, alibi_slopes: torch.Tensor | None = None,
                    logits_soft_cap: float | None = None) -> torch.Tensor:
    """Same contract as torch_backend.paged_attention."""
    usable = (query.dtype in KV_FORMATS and kv_cache.dtype in KV_FORMATS and query.shape[2] % 8 == 0
              and load_kernel_library() is not None)
    if not usable:
        return torch_backend.paged_attention(query, kv_cache, metadata, scale, sliding_window, alibi_slopes,
                                             logits_soft_cap)
    query_lens = metadata.query_lens_np
    decodes, prompts = np.flatnonzero(query_lens == 1), np.flatnonzero(query_lens > 1)
    # The prefill kernel has no sliding window, ALiBi or soft-cap, and takes at most
    # PREFILL_MAX_GROUP query heads per KV head; those prompts use the torch reference.
    prefill_in_c = (sliding_window is None and alibi_slopes is None and logits_soft_cap is None
                    and query.shape[1] // kv_cache.shape[3] <= PREFILL_MAX_GROUP)
    # The kernels compute in float32 (16-bit queries are widened: [T, H, D] is small next to
    # the context they read) and take dense rows (queries rotated in place are QKV slices).
    query32 = query.float().contiguous()
    output = torch.empty_like(query32)
    if len(decodes):
        decode_attention(output, query32, kv_cache, metadata.block_table, metadata.query_start_np[decodes], decodes,
                         metadata.seq_lens_np[decodes], scale, sliding_window, alibi_slopes, logits_soft_cap)
    if len(prompts) and prefill_in_c:
        prefill_attention(output, query32, kv_cache, metadata.block_table, metadata.query_start_np[prompts],
                          query_lens[prompts], prompts, metadata.seq_lens_np[prompts], scale)
    output = output.to(query.dtype)
    if len(prompts) and not prefill_in_c:
        torch_backend.attend_each(output, query, kv_cache, metadata, prompts, scale, sliding_window, alibi_slopes,
                                  logits_soft_cap)
    return output
