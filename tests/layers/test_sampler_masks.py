"""The sampler's token controls: packed bitmasks (grammars, allowed_token_ids), logit
bias and suppressed tokens, each against a plain per-token reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedllm.layers.sampler import SamplingBatch, apply_token_bitmask, sample
from pagedllm.worker.model_runner import token_bitmask

VOCAB = 101  # not a multiple of 32: the last word of a mask is partly past the vocabulary


def _batch(num_rows: int, **fields) -> SamplingBatch:
    defaults = dict(temperature=torch.zeros(num_rows), top_k=None, top_p=None, min_p=None, presence_penalty=None,
                    frequency_penalty=None, repetition_penalty=None, output_token_counts=None,
                    prompt_token_mask=None, suppressed_tokens=[], seeds=[None] * num_rows,
                    num_logprobs=[None] * num_rows)
    return SamplingBatch(**{**defaults, **fields})


@pytest.mark.parametrize("vocab_size", [1, 31, 32, 33, VOCAB, 4096])
def test_token_bitmask_sets_exactly_the_given_tokens(vocab_size):
    rng = np.random.default_rng(vocab_size)
    token_ids = sorted(set(rng.integers(0, vocab_size, size=max(1, vocab_size // 3)).tolist()))
    mask = token_bitmask(token_ids, vocab_size)
    assert mask.dtype == np.int32 and mask.shape == (-(-vocab_size // 32),)
    set_bits = [32 * word + bit for word in range(mask.size) for bit in range(32)
                if (int(mask[word]) >> bit) & 1]
    assert set_bits == token_ids


def test_apply_token_bitmask_matches_a_per_token_reference():
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB)
    allowed = [[0, 5, 100], [31, 32, 33], list(range(0, VOCAB, 2))]
    rows = torch.tensor([0, 2, 3])
    bitmask = torch.from_numpy(np.stack([token_bitmask(ids, VOCAB) for ids in allowed]))
    expected = logits.clone()
    for row, ids in zip(rows.tolist(), allowed):
        banned = [t for t in range(VOCAB) if t not in ids]
        expected[row, banned] = float("-inf")
    apply_token_bitmask(logits, rows, bitmask)
    assert torch.equal(logits, expected)  # row 1 is untouched


def test_tokens_past_the_mask_width_are_not_allowed():
    logits = torch.zeros(1, 40)  # the model's vocabulary is wider than the 32 tokens the mask covers
    apply_token_bitmask(logits, torch.tensor([0]), torch.from_numpy(token_bitmask([3], 32))[None])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [3]


def test_greedy_and_sampled_rows_only_pick_allowed_tokens():
    torch.manual_seed(1)
    logits = torch.randn(2, VOCAB) * 5
    allowed = [7, 42, 99]
    bitmask = torch.from_numpy(np.stack([token_bitmask(allowed, VOCAB)] * 2))
    for seed in range(20):
        batch = _batch(2, temperature=torch.tensor([0.0, 1.0]), seeds=[None, seed],
                       allowed_bitmask=(torch.tensor([0, 1]), bitmask))
        tokens, _ = sample(logits.clone(), batch)
        assert set(tokens.tolist()) <= set(allowed)
    assert tokens[0].item() == allowed[int(logits[0, allowed].argmax())]


def test_logit_bias_bans_and_forces_tokens_per_row():
    logits = torch.zeros(3, VOCAB)
    logits[:, 10] = 5.0  # every row's favourite
    bias = (torch.tensor([0, 1, 1]), torch.tensor([10, 10, 64]), torch.tensor([-100.0, -100.0, 100.0]))
    tokens, _ = sample(logits, _batch(3, logit_bias=bias))
    # Row 0: 10 banned, the rest tie at 0 (argmax takes the first); row 1: 64 forced; row 2: untouched.
    assert tokens.tolist() == [0, 64, 10]


def test_logprobs_are_the_models_before_bias_and_masks():
    torch.manual_seed(2)
    logits = torch.randn(1, VOCAB)
    expected = torch.log_softmax(logits, dim=-1)
    batch = _batch(1, num_logprobs=[1], logit_bias=(torch.tensor([0]), torch.tensor([3]), torch.tensor([50.0])),
                   allowed_bitmask=(torch.tensor([0]), torch.from_numpy(token_bitmask([3, 4], VOCAB))[None]))
    tokens, logprobs = sample(logits.clone(), batch)
    assert tokens.tolist() == [3]
    assert torch.allclose(logprobs, expected)
