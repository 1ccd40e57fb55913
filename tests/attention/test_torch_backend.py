"""The plain-PyTorch paged attention (the baseline) against a naive dense
reference: every batch shape x every feature, float32, plus half precisions and
16-bit pools under float32 queries."""

from __future__ import annotations

import pytest
import torch

from pagedllm.attention import torch_backend
from tests.attention.helpers import CASES, FEATURES, KV_DTYPES, case_params, check_backend, make_batch

# Unused pool slots hold finite garbage: the batched decode path reads whole blocks
# and zeroes padding through the softmax (0 * garbage), which NaN would not survive.
FILL = 100.0


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("case", case_params())
def test_matches_naive_reference(case, feature):
    check_backend(torch_backend, case, feature, fill=FILL)


@pytest.mark.parametrize("feature", ["plain", "all"])
@pytest.mark.parametrize("case", [CASES["mixed_gqa"], CASES["decode_only"]], ids=["mixed_gqa", "decode_only"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(case, feature, dtype):
    check_backend(torch_backend, case, feature, dtype=dtype, fill=FILL)


@pytest.mark.parametrize("feature", ["plain", "all"])
@pytest.mark.parametrize("case", [CASES["mixed_gqa"], CASES["decode_only"]], ids=["mixed_gqa", "decode_only"])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_16_bit_pool_under_float32_queries(case, feature, kv_dtype):
    check_backend(torch_backend, case, feature, fill=FILL, kv_dtype=kv_dtype)


def test_write_kv_stores_through_slots():
    batch = make_batch(CASES["mixed_gqa"], fill=FILL)
    before = batch.kv_cache.clone()
    torch_backend.write_kv(batch.new_key, batch.new_value, batch.kv_cache, batch.metadata.slot_mapping)
    flat = batch.kv_cache.flatten(1, 2)  # [2, slots, Hkv, D]
    slots = batch.metadata.slot_mapping
    torch.testing.assert_close(flat[0, slots], batch.new_key, rtol=0, atol=0)
    torch.testing.assert_close(flat[1, slots], batch.new_value, rtol=0, atol=0)
    untouched = torch.ones(flat.shape[1], dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(flat[:, untouched], before.flatten(1, 2)[:, untouched])
