"""layers.linear.linear (oneDNN for float32 on CPU) against torch's F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm.layers.linear import linear


@pytest.mark.parametrize("rows", [1, 7, 128])
@pytest.mark.parametrize("in_features,out_features", [(64, 3000), (576, 960), (1536, 576)])
@pytest.mark.parametrize("bias", [False, True])
def test_float32_matches_plain_pytorch(rows, in_features, out_features, bias):
    generator = torch.Generator().manual_seed(rows * 7 + out_features)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5
    b = torch.randn(out_features, generator=generator) if bias else None
    out = linear(x, weight, b)
    assert out.shape == (rows, out_features) and out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_a_sliced_input_matches():
    """Hidden states gathered for the LM head are a fresh tensor, but row views of a
    batch must work too."""
    x = torch.randn(10, 64)
    weight = torch.randn(32, 64)
    torch.testing.assert_close(linear(x[2:8], weight), F.linear(x[2:8], weight), rtol=1e-5, atol=1e-5)


def test_other_dtypes_are_plain_pytorch():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    weight = torch.randn(16, 64, dtype=torch.bfloat16)
    assert torch.equal(linear(x, weight), F.linear(x, weight))
