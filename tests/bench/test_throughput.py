"""`bench throughput` on a tiny checkpoint: token counts, rates and KV waste add up."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from pagedllm.bench.throughput import run_throughput
from pagedllm.bench.workload import BenchRequest
from tests.tiny_models import TINY_VOCAB_SIZE, save_tiny_model


def test_throughput_counts_and_rates(tmp_path):
    config = LlamaConfig(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    save_tiny_model(str(tmp_path), LlamaForCausalLM, config)
    requests = [BenchRequest([5] * 10, 7), BenchRequest(list(range(20, 53)), 3), BenchRequest([9, 8], 12)]
    result = run_throughput(requests, model=str(tmp_path), dtype="float32", num_kv_blocks=64, block_size=4)
    assert (result["num_requests"], result["prompt_tokens"], result["output_tokens"]) == (3, 45, 22)
    assert result["requests_per_s"] == pytest.approx(3 / result["elapsed_s"])
    assert result["total_tokens_per_s"] == pytest.approx(67 / result["elapsed_s"])
    # Only partial last blocks are unfilled: at most block_size - 1 slots per running request.
    assert 0 < result["kv_cache_waste"] < 0.5
    assert result["num_steps"] >= 12  # the longest request needs 12 decode steps
    assert (result["dtype"], result["kv_cache_dtype"], result["label"]) == ("float32", "float32", "pagedllm float32")
