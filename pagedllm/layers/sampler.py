"""Batched sampling: penalties, logit bias, token masks (grammars, allowed tokens, bad
words), temperature, top-k / top-p / min-p, seeds, logprobs.

Every request in the batch has its own parameters, so each is a [B] tensor and
rows that do not use a feature see a neutral value. Seeded requests draw their
noise from a generator seeded by (seed, sample index, output position): the
same tokens come out whatever the batch, chunking or preemption.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from pagedllm.core.scheduler_output import TokenLogprobs

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, sample_index: int, position: int) -> int:
    """splitmix64 of the three numbers -> a 63-bit generator seed."""
    value = (seed * 0x9E3779B97F4A7C15 + sample_index * 0xBF58476D1CE4E5B9 + position) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (value ^ (value >> 31)) & ((1 << 63) - 1)


@dataclass
class SamplingBatch:
    """Per-row sampling parameters for B rows of logits (built by the model runner)."""

    temperature: torch.Tensor  # [B] float32; 0 = greedy
    top_k: torch.Tensor | None  # [B] int64, vocab size = off
    top_p: torch.Tensor | None  # [B] float32, 1 = off
    min_p: torch.Tensor | None  # [B] float32, 0 = off
    presence_penalty: torch.Tensor | None  # [B, 1]
    frequency_penalty: torch.Tensor | None  # [B, 1]
    repetition_penalty: torch.Tensor | None  # [B, 1]
    output_token_counts: torch.Tensor | None  # [B, V] counts of each token in the output so far
    prompt_token_mask: torch.Tensor | None  # [B, V] bool, token occurs in the prompt
    suppressed_tokens: list[tuple[int, list[int]]]  # (row, token ids) masked out (min_tokens, bad_words)
    seeds: list[int | None]  # per row: mixed seed for this position, or None
    num_logprobs: list[int | None]  # per row: top-N logprobs asked for
    # (rows [N], token ids [N], biases [N]): logit_bias entries of the whole batch.
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # (rows [K], int32 [K, ceil(V / 32)]): the tokens each constrained row may sample
    # (grammar and allowed_token_ids); bit j of word i allows token 32 * i + j.
    allowed_bitmask: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def all_greedy(self) -> bool:
        return bool((self.temperature == 0).all())


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    if batch.repetition_penalty is not None:
        seen = batch.prompt_token_mask | (batch.output_token_counts > 0)
        penalty = batch.repetition_penalty
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    if batch.frequency_penalty is not None:
        counts = batch.output_token_counts.to(logits.dtype)
        logits = logits - batch.frequency_penalty * counts - batch.presence_penalty * (counts > 0)
    return logits


@functools.cache
def _byte_biases(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8]: for each byte value, 0 where its bit is set and -inf where it is not."""
    bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
    return torch.zeros(256, 8, dtype=dtype).masked_fill_(bits == 0, float("-inf")).to(device)


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: -inf for every token of logits[rows] whose bit is 0. logits [B, V],
    rows [K] (distinct), bitmask int32 [K, W]; tokens past 32 * W are not allowed.

    Each mask byte looks up its 8 biases and the rows get them added: ~3x faster on CPU
    than unpacking the bits and masked_fill (128 x 49k: 12 against 36 ms), and exact
    (x + 0 is x, x + -inf is -inf)."""
    bias = _byte_biases(logits.device, logits.dtype).index_select(
        0, bitmask.view(torch.uint8).flatten().long()).view(bitmask.shape[0], -1)  # [K, 32 * W]
    vocab_size = logits.shape[1]
    if bias.shape[1] < vocab_size:
        bias = torch.nn.functional.pad(bias, (0, vocab_size - bias.shape[1]), value=float("-inf"))
    logits.index_add_(0, rows, bias[:, :vocab_size])


def _filter_probs(probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Zero the probabilities outside top-k / top-p / min-p (rows keep >= 1 token)."""
    if batch.min_p is not None:
        threshold = batch.min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    if batch.top_k is None and batch.top_p is None:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    drop = torch.zeros_like(sorted_probs, dtype=torch.bool)
    if batch.top_k is not None:
        ranks = torch.arange(probs.shape[-1], device=probs.device).unsqueeze(0)
        drop |= ranks >= batch.top_k.unsqueeze(1)
    if batch.top_p is not None:
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop |= mass_before >= batch.top_p.unsqueeze(1)
    drop[:, 0] = False
    return probs.masked_fill(drop.scatter(1, order, drop), 0.0)


def _random_sample(probs: torch.Tensor, seeds: list[int | None]) -> torch.Tensor:
    """Inverse-CDF sampling: one uniform draw u in (0, 1] per row (seeded rows from their
    own generator) and the first token whose cumulative probability reaches u times the
    row's total. It draws B numbers where the exponential race (argmax p / q, q ~ Exp(1))
    draws B x V: 40 x 49k on a CPU, ~1 ms against 34 ms. The cumulative sum is float64, so
    the rounding of 49k float32 additions cannot shift a boundary; a token of probability
    0 is never chosen (u > 0), and nothing waits on the host."""
    uniform = 1.0 - torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device)
    for row, seed in enumerate(seeds):
        if seed is not None:
            generator = torch.Generator(device=probs.device).manual_seed(seed)
            uniform[row] = 1.0 - torch.rand(1, dtype=torch.float64, device=probs.device, generator=generator)
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)  # [B, V]
    tokens = torch.searchsorted(cdf, uniform * cdf[:, -1:])  # [B, 1]
    return tokens.squeeze(1).clamp_(max=probs.shape[1] - 1)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [B, V] float32 -> (token ids [B], raw log-probabilities [B, V], or
    None when no row asked for logprobs).

    Log-probabilities are those of the model (before penalties and
    temperature), as vLLM reports them."""
    wants_logprobs = any(n is not None for n in batch.num_logprobs)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
    logits = apply_penalties(logits, batch)
    if batch.logit_bias is not None:
        logits = logits.index_put(batch.logit_bias[:2], batch.logit_bias[2], accumulate=True)
    for row, token_ids in batch.suppressed_tokens:
        logits[row, token_ids] = float("-inf")
    if batch.allowed_bitmask is not None:
        apply_token_bitmask(logits, *batch.allowed_bitmask)
    greedy_tokens = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy_tokens, raw_logprobs
    temperature = torch.where(batch.temperature == 0, 1.0, batch.temperature).unsqueeze(1)
    probs = _filter_probs(torch.softmax(logits / temperature, dim=-1), batch)
    sampled = _random_sample(probs, batch.seeds)
    return torch.where(batch.temperature == 0, greedy_tokens, sampled), raw_logprobs


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> list[TokenLogprobs]:
    """For each row: the logprob and rank of token_ids[row], then the top num_top.
    logprobs [N, V], token_ids [N]."""
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))  # [N, 1]
    ranks = (logprobs > chosen).sum(dim=1) + 1
    top_values, top_ids = logprobs.topk(num_top, dim=1) if num_top else (chosen[:, :0], token_ids[:, None][:, :0])
    result = []
    for row, (token, value, rank) in enumerate(zip(token_ids.tolist(), chosen[:, 0].tolist(), ranks.tolist())):
        result.append(TokenLogprobs([token] + top_ids[row].tolist(), [value] + top_values[row].tolist(),
                                    [rank] + list(range(1, num_top + 1))))
    return result
