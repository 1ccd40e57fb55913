"""The embedded model through the whole engine against transformers: identical
greedy tokens whatever the batching, prefix caching, preemption or chunking;
with a 16-bit KV cache, transformers' argmax or a near tie at every step."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from tests.tiny_models import hf_greedy

NUM_TOKENS = 32
CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
]
RAW = [
    "The quick brown fox",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the river,",
]


@pytest.fixture(scope="module")
def llm():
    # A 128-token context keeps the pool small enough to force preemption below.
    return LLM(dtype="float32", max_model_len=256, num_kv_blocks=256, block_size=16)


@pytest.fixture(scope="module")
def prompts(llm):
    processor = llm.llm_engine.input_processor
    token_ids = [processor.tokenize_chat(processor.apply_chat_template([{"role": "user", "content": c}]))
                 for c in CHATS]
    token_ids += [processor.tokenize(text)[1] for text in RAW]
    # Two prompts sharing a long prefix exercise prefix-cache hits.
    token_ids.append(token_ids[0][:-3] + token_ids[4][:5])
    return token_ids


@pytest.fixture(scope="module")
def expected(hf_smollm2, prompts):
    return [hf_greedy(hf_smollm2, ids, NUM_TOKENS) for ids in prompts]


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def _assert_all_blocks_free(llm: LLM) -> None:
    kv = llm.llm_engine.engine_core.scheduler.kv
    assert kv.num_free_blocks == kv.pool.num_blocks
    assert not kv.requests


def test_batch_equals_transformers(llm, prompts, expected):
    assert _greedy(llm, prompts) == expected
    _assert_all_blocks_free(llm)


def test_one_at_a_time_equals_transformers(llm, prompts, expected):
    assert [_greedy(llm, [ids])[0] for ids in prompts] == expected
    _assert_all_blocks_free(llm)


def test_prefix_cache_hits_change_nothing(llm, prompts, expected):
    kv = llm.llm_engine.engine_core.scheduler.kv
    hits_before = kv.prefix_cache_stats.num_hit_tokens
    # The blocks of the earlier tests are still cached: this run re-uses them.
    assert _greedy(llm, prompts) == expected
    assert kv.prefix_cache_stats.num_hit_tokens > hits_before
    _assert_all_blocks_free(llm)


def _with_engine(llm: LLM, **overrides):
    """The same loaded model under other scheduler / cache settings."""
    from pagedllm.core.kv_cache_manager import KVCacheManager
    from pagedllm.core.scheduler import Scheduler

    core = llm.llm_engine.engine_core
    old = core.scheduler
    settings = dict(num_blocks=old.kv.pool.num_blocks, enable_prefix_caching=old.kv.enable_prefix_caching,
                    max_num_seqs=old.max_num_seqs, max_num_batched_tokens=old.max_num_batched_tokens)
    settings.update(overrides)
    kv = KVCacheManager(settings["num_blocks"], old.kv.block_size, settings["enable_prefix_caching"])
    core.scheduler = Scheduler(kv, settings["max_num_seqs"], settings["max_num_batched_tokens"],
                               old.max_model_len)
    return old


@pytest.mark.parametrize("overrides", [
    dict(enable_prefix_caching=False),
    dict(num_blocks=16),  # 7 requests of up to 4-5 blocks each: preemption
    dict(max_num_batched_tokens=7),  # prompts chunked over many steps
    dict(max_num_seqs=2),
], ids=["no-prefix-cache", "preemption", "chunked-prefill", "two-at-a-time"])
def test_scheduling_settings_do_not_change_tokens(llm, prompts, expected, overrides):
    old = _with_engine(llm, **overrides)
    try:
        assert _greedy(llm, prompts) == expected
        scheduler = llm.llm_engine.engine_core.scheduler
        if "num_blocks" in overrides:
            assert scheduler.num_preemptions_total > 0
        _assert_all_blocks_free(llm)
    finally:
        llm.llm_engine.engine_core.scheduler = old


# A 16-bit KV cache rounds K/V, so where transformers' two best tokens are this
# close (in logits) the engine may take the other one.
NEAR_TIE = 0.02


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def llm_16_bit_kv(request):
    return LLM(dtype="float32", max_model_len=256, num_kv_blocks=256, block_size=16, kv_cache_dtype=request.param)


def _largest_logit_gap(hf_model, prompt: list[int], tokens: list[int]) -> float:
    """Along the engine's own tokens: transformers' best logit minus the logit
    of the token the engine chose, at the worst step (0 when all are its argmax)."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]  # [n, vocab]
    chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    return float((logits.max(dim=1).values - chosen).max())


def test_16_bit_kv_cache_is_stored_in_half_the_bytes(llm_16_bit_kv, llm):
    executors = [m.llm_engine.engine_core.executor for m in (llm_16_bit_kv, llm)]
    assert executors[0].bytes_per_block() * 2 == executors[1].bytes_per_block()
    kv_caches = executors[0].worker.runner.cache.kv_caches
    assert kv_caches[0].dtype == getattr(torch, llm_16_bit_kv.llm_engine.config.cache.kv_cache_dtype)


def test_16_bit_kv_cache_picks_transformers_argmax_or_a_near_tie(llm_16_bit_kv, hf_smollm2, prompts):
    gaps = [_largest_logit_gap(hf_smollm2, ids, tokens)
            for ids, tokens in zip(prompts, _greedy(llm_16_bit_kv, prompts))]
    assert max(gaps) < NEAR_TIE, gaps


def _assert_same_up_to_near_ties(hf_model, prompts: list[list[int]], got: list[list[int]],
                                 expected: list[list[int]], near_tie: float = NEAR_TIE) -> None:
    """The token lists agree, or first differ where transformers' logits of the two tokens
    are within NEAR_TIE: 16-bit K/V, summed in another order by another kernel (a chunk
    of a prompt attends through the pool, a whole prompt in one pass), may flip a near-tie."""
    for prompt, tokens, reference in zip(prompts, got, expected):
        if tokens == reference:
            continue
        first = next(i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b)
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + reference[:first]])).logits[0, -1]
        assert abs(float(logits[tokens[first]] - logits[reference[first]])) < near_tie, (first, tokens, reference)


def test_16_bit_kv_cache_tokens_do_not_depend_on_scheduling(llm_16_bit_kv, hf_smollm2, prompts):
    batched = _greedy(llm_16_bit_kv, prompts)
    assert [_greedy(llm_16_bit_kv, [ids])[0] for ids in prompts] == batched
    old = _with_engine(llm_16_bit_kv, num_blocks=16, max_num_batched_tokens=7)  # preemption, chunked prompts
    try:
        _assert_same_up_to_near_ties(hf_smollm2, prompts, _greedy(llm_16_bit_kv, prompts), batched)
        assert llm_16_bit_kv.llm_engine.engine_core.scheduler.num_preemptions_total > 0
    finally:
        llm_16_bit_kv.llm_engine.engine_core.scheduler = old


# A bfloat16 model rounds every activation to 8 significant bits: its choices are checked
# against transformers' float32 logits along its own tokens, with this much slack.
BFLOAT16_NEAR_TIE = 0.5


@pytest.fixture(scope="module")
def llm_bfloat16():
    return LLM(dtype="bfloat16", max_model_len=256, num_kv_blocks=256, block_size=16)


def test_bfloat16_model_picks_float32_argmax_or_a_near_tie(llm_bfloat16, hf_smollm2, prompts):
    """The CPU platform's bfloat16 path end to end: fused kernels, packed oneDNN weights with
    bucketed rows, decode attention from a bfloat16 pool."""
    gaps = [_largest_logit_gap(hf_smollm2, ids, tokens)
            for ids, tokens in zip(prompts, _greedy(llm_bfloat16, prompts))]
    assert max(gaps) < BFLOAT16_NEAR_TIE, gaps


def test_bfloat16_tokens_depend_on_batching_only_at_near_ties(llm_bfloat16, hf_smollm2, prompts):
    """oneDNN picks its bfloat16 matmul kernel by row count (AVX512-BF16 for a few rows, AMX
    tiles for more), and they sum in different orders: a row can round differently in
    another batch (docs/design.md). float32 is the batch-exact path."""
    batched = _greedy(llm_bfloat16, prompts)
    alone = [_greedy(llm_bfloat16, [ids])[0] for ids in prompts]
    _assert_same_up_to_near_ties(hf_smollm2, prompts, alone, batched, BFLOAT16_NEAR_TIE)
