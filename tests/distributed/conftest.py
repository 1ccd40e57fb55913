"""Tiny random checkpoints whose shapes stress the sharding (a single KV head for
2 ranks, a vocabulary not divisible by 2, attention biases), and helpers to run
the same prompts through engines of different tensor-parallel sizes."""

from __future__ import annotations

import psutil
import pytest
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from pagedllm import LLM, SamplingParams
from tests.tiny_models import save_tiny_model

MAX_MODEL_LEN = 128
# Small enough that the prompts below preempt each other, and a small token budget
# chunks the long prompt: TP must not change outputs under either.
ENGINE_ARGS = dict(dtype="float32", max_model_len=MAX_MODEL_LEN, num_kv_blocks=14, max_num_batched_tokens=48)
PROMPTS = [[5, 6, 7], list(range(20, 37)), list(range(40, 110)), [200, 201, 202, 203, 204, 205] * 4]
PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)


def _tiny(config_class, model_class, **overrides):
    keys = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=MAX_MODEL_LEN, bos_token_id=0, eos_token_id=1) | overrides
    return config_class(**keys), model_class


TINY_MODELS = {
    # One KV head for two ranks (replicated) and a vocabulary of 321 (padded to 322).
    "llama-kv1-vocab321": _tiny(LlamaConfig, LlamaForCausalLM, num_key_value_heads=1, vocab_size=321),
    # KV heads split across ranks, biases on Q/K/V (loaded as shards, not summed).
    "qwen2-kv2-bias": _tiny(Qwen2Config, Qwen2ForCausalLM, num_key_value_heads=2, vocab_size=320),
}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    folders = {}
    for name, (config, model_class) in TINY_MODELS.items():
        folders[name] = str(tmp_path_factory.mktemp(name))
        save_tiny_model(folders[name], model_class, config)
    return folders


def greedy_outputs(llm: LLM, prompts=PROMPTS, params=PARAMS) -> list[tuple[list[int], list[dict[int, float]]]]:
    """Each prompt's tokens and, per position, the logprobs of its top tokens."""
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [(o.outputs[0].token_ids,
             [{token: lp.logprob for token, lp in position.items()} for position in o.outputs[0].logprobs])
            for o in outputs]


def assert_same_outputs(actual, expected) -> None:
    """Tokens identical; logprobs equal up to float32 sums taken in another order."""
    assert [tokens for tokens, _ in actual] == [tokens for tokens, _ in expected]
    for (_, actual_logprobs), (_, expected_logprobs) in zip(actual, expected):
        assert [sorted(p) for p in actual_logprobs] == [sorted(p) for p in expected_logprobs]
        assert actual_logprobs == [pytest.approx(p, abs=1e-4) for p in expected_logprobs]


def shutdown(llm: LLM) -> None:
    llm.llm_engine.engine_core.shutdown()


def child_pids() -> set[int]:
    """This process's descendants, except multiprocessing's resource tracker (one per
    process, started with the first spawned child and kept until exit)."""
    pids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                pids.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return pids
