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


class StepPlan:
    """The arguments of the C kernels that are the same in every layer of a step,
    converted once: the split of the batch into single-token (decode) and multi-token
    (prompt chunk) requests, their row / length arrays as int64 C pointers, and the
    block table. Converted in each layer's call they cost more than the decode kernel
    itself at batch 1: K/V write + attention took 100 us a layer, 33 us with the plan."""

    def __init__(self, metadata: AttentionMetadata) -> None:
        query_lens = metadata.query_lens_np
        self.decodes, self.prompts = np.flatnonzero(query_lens == 1), np.flatnonzero(query_lens > 1)
        self.block_table = metadata.block_table.contiguous()
        self.block_table_pointer = pointer(self.block_table)
        # The arrays are kept here, so that their pointers stay valid for the step.
        self._decode_arrays = [np.ascontiguousarray(a, dtype=np.int64) for a in (
            metadata.query_start_np[self.decodes], self.decodes, metadata.seq_lens_np[self.decodes])]
        self._prompt_arrays = [np.ascontiguousarray(a, dtype=np.int64) for a in (
            metadata.query_start_np[self.prompts], query_lens[self.prompts], self.prompts,
            metadata.seq_lens_np[self.prompts])]
        self.decode_args = [a.ctypes.data_as(ctypes.c_void_p) for a in self._decode_arrays]
        self.prompt_args = [a.ctypes.data_as(ctypes.c_void_p) for a in self._prompt_arrays]

    @staticmethod
    def of(metadata: AttentionMetadata) -> StepPlan:
        plan = metadata.backend_state.get("cpu")
        if plan is None:
            plan = metadata.backend_state["cpu"] = StepPlan(metadata)
        return plan


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """key/value [T, Hkv, D] -> their slots in kv_cache, cast to its dtype (csrc/write_kv.c)."""
    lib = load_kernel_library()
    key, value = key.to(kv_cache.dtype), value.to(kv_cache.dtype)
    dense_rows = all(x.stride(2) == 1 and x.stride(1) == x.shape[2] for x in (key, value))
    if lib is None or not dense_rows or not kv_cache.is_contiguous():
        torch_backend.write_kv(key, value, kv_cache, slot_mapping)
        return
    slots = slot_mapping.to(torch.int64).contiguous()  # the model runner's is already: no copy
    element = kv_cache.element_size()
    lib.write_kv(pointer(kv_cache), pointer(key), pointer(value), pointer(slots), INT64(key.shape[0]),
                 INT64(key.shape[1] * key.shape[2] * element), INT64(key.stride(0) * element),
                 INT64(value.stride(0) * element), INT64(kv_cache.shape[1] * kv_cache.shape[2]))


def decode_attention(output: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor, plan: StepPlan, scale: float,
                     sliding_window: int | None, alibi_slopes: torch.Tensor | None,
                     logits_soft_cap: float | None, bf16_queries: bool = False) -> None:
    """Writes output's rows of the plan's single-token queries. query/output [T, H, D]
    float32; kv_cache float32, float16 or bfloat16. bf16_queries: query holds bfloat16
    values (a bfloat16 model), which lets a bfloat16 cache use AVX512-BF16 dot products."""
    lib = load_kernel_library()
    num_heads, head_dim = query.shape[1], query.shape[2]
    _, num_blocks, block_size, num_kv_heads, _ = kv_cache.shape
    slopes = alibi_slopes.float().contiguous() if alibi_slopes is not None else None
    status = lib.paged_decode_attention(
        pointer(output), pointer(query), pointer(kv_cache), INT64(KV_FORMATS[kv_cache.dtype]),
        plan.block_table_pointer, *plan.decode_args, INT64(len(plan.decodes)), INT64(num_blocks),
        INT64(plan.block_table.shape[1]), INT64(block_size), INT64(num_heads), INT64(num_kv_heads),
        INT64(head_dim), FLOAT(scale), INT64(sliding_window or 0), FLOAT(logits_soft_cap or 0.0),
        pointer(slopes) if slopes is not None else None, INT64(bf16_queries))
    if status != 0:
        raise MemoryError(f"CPU decode attention: out of memory (or head size {head_dim} not a multiple of 8)")


def prefill_attention(output: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor, plan: StepPlan,
                      scale: float, bf16_queries: bool = False) -> None:
    """Writes output's rows of the plan's multi-token queries (prompt chunks), causal over
    each request's context (csrc/prefill_attention.c). query/output [T, H, D] float32;
    bf16_queries as for decode_attention."""
    lib = load_kernel_library()
    num_heads, head_dim = query.shape[1], query.shape[2]
    _, num_blocks, block_size, num_kv_heads, _ = kv_cache.shape
    status = lib.paged_prefill_attention(
        pointer(output), pointer(query), pointer(kv_cache), INT64(KV_FORMATS[kv_cache.dtype]),
        plan.block_table_pointer, *plan.prompt_args, INT64(len(plan.prompts)), INT64(num_blocks),
        INT64(plan.block_table.shape[1]), INT64(block_size), INT64(num_heads), INT64(num_kv_heads), INT64(head_dim),
        FLOAT(scale), INT64(bf16_queries))
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
    plan = StepPlan.of(metadata)
    # The prefill kernel has no sliding window, ALiBi or soft-cap, and takes at most
    # PREFILL_MAX_GROUP query heads per KV head; those prompts use the torch reference.
    prefill_in_c = (sliding_window is None and alibi_slopes is None and logits_soft_cap is None
                    and query.shape[1] // kv_cache.shape[3] <= PREFILL_MAX_GROUP)
    # The kernels compute in float32 (16-bit queries are widened: [T, H, D] is small next to
    # the context they read) and take dense rows (queries rotated in place are QKV slices).
    query32 = query.float().contiguous()
    output = torch.empty_like(query32)
    if len(plan.decodes):
        decode_attention(output, query32, kv_cache, plan, scale, sliding_window, alibi_slopes, logits_soft_cap,
                         bf16_queries=query.dtype == torch.bfloat16)
    if len(plan.prompts) and prefill_in_c:
        prefill_attention(output, query32, kv_cache, plan, scale, bf16_queries=query.dtype == torch.bfloat16)
    output = output.to(query.dtype)
    if len(plan.prompts) and not prefill_in_c:
        torch_backend.attend_each(output, query, kv_cache, metadata, plan.prompts, scale, sliding_window,
                                  alibi_slopes, logits_soft_cap)
    return output
