"""The CPU decode stack (platforms/cpu/decode_stack.py): decode steps of Llama-shaped
models run in one C call must give the layers' results bit for bit, and models or steps
it does not cover must keep running through the layers."""

from __future__ import annotations

import pytest
import torch
from transformers import (GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from pagedllm import LLM, SamplingParams
from pagedllm.platforms.cpu.decode_stack import DecodeStack
from pagedllm.platforms.cpu.kernels import load_kernel_library
from tests.models.helpers import BLOCK_SIZE, MAX_BATCHED_TOKENS, make_prompts, save_hf_model, tiny_kwargs

pytestmark = pytest.mark.skipif(load_kernel_library() is None, reason="no C compiler: no CPU kernels")

CASES = {
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(**tiny_kwargs())),
    # Q/K/V biases, tied embeddings
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**tiny_kwargs(tie_word_embeddings=True))),
    # a window shorter than the contexts it decodes
    "mistral": (MistralForCausalLM, lambda: MistralConfig(**tiny_kwargs(sliding_window=6))),
    # per-head q/k norms, head_dim != hidden / heads, a window on the second layer only
    "qwen3": (Qwen3ForCausalLM, lambda: Qwen3Config(**tiny_kwargs(head_dim=32, use_sliding_window=True,
                                                                  sliding_window=6, max_window_layers=1))),
}
UNCOVERED = {
    "gemma": (GemmaForCausalLM, lambda: GemmaConfig(**tiny_kwargs(head_dim=16))),  # GeGLU
}


def _model(llm: LLM):
    return llm.llm_engine.engine_core.executor.worker.runner.model


def _engine(path: str, **kwargs) -> LLM:
    return LLM(path, num_kv_blocks=128, block_size=BLOCK_SIZE, max_num_batched_tokens=MAX_BATCHED_TOKENS,
               **kwargs)


def _generate(llm: LLM, prompts: list[list[int]]) -> list[tuple[list[int], list]]:
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=5)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), [{t: lp.logprob for t, lp in step.items()}
                                             for step in o.outputs[0].logprobs]) for o in outputs]


def _assert_stack_equals_layers(path: str, prompts: list[list[int]], monkeypatch, **kwargs) -> None:
    """Greedy tokens and logprobs with the stack equal, bit for bit, those of an engine
    whose decode steps go through the layers; the stack ran batches of several sizes."""
    rows_run = []
    original = DecodeStack.__call__

    def counting(self, hidden_states, *args):
        rows_run.append(hidden_states.shape[0])
        return original(self, hidden_states, *args)

    monkeypatch.setattr(DecodeStack, "__call__", counting)
    with_stack = _engine(path, **kwargs)
    assert _model(with_stack).model.decode_stack is not None
    fast = _generate(with_stack, prompts)
    assert len(set(rows_run)) >= 2, rows_run  # decode steps of one and of several requests
    del with_stack
    layers_only = _engine(path, **kwargs)
    _model(layers_only).model.decode_stack = None
    calls = len(rows_run)
    assert _generate(layers_only, prompts) == fast
    assert len(rows_run) == calls


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    model_class, config = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    save_hf_model(folder, model_class, config())
    return str(folder)


def test_float32_decode_steps_equal_the_layers(checkpoint, monkeypatch):
    # lengths 1..38: requests finish prefilling at different steps, so decode-only steps
    # of 1, 2 and 4 rows and mixed steps (through the layers) alternate
    prompts = make_prompts(lengths=(1, 7, 21, 38), seed=3)
    _assert_stack_equals_layers(checkpoint, prompts, monkeypatch, dtype="float32")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_decode_steps_equal_the_layers(arch, tmp_path, monkeypatch):
    """Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 segments through the int8 GEMM; qwen2's biases and untied head."""
    from tests.loader.test_gguf_loader import _quantized_case

    path, _ = _quantized_case(arch, tmp_path)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 96, (n,), generator=generator).tolist() for n in (1, 9, 40)]
    _assert_stack_equals_layers(path, prompts, monkeypatch, quantization="gguf", skip_tokenizer_init=True)


@pytest.mark.parametrize("name", sorted(UNCOVERED))
def test_layers_it_does_not_know_keep_their_path(name, tmp_path):
    model_class, config = UNCOVERED[name]
    save_hf_model(tmp_path, model_class, config())
    llm = _engine(str(tmp_path), dtype="float32")
    assert _model(llm).model.decode_stack is None
    assert len(_generate(llm, make_prompts()[:1])[0][0]) == 24


def test_16_bit_models_keep_the_layers(tmp_path):
    model_class, config = CASES["llama"]
    save_hf_model(tmp_path, model_class, config())
    assert _model(_engine(str(tmp_path), dtype="bfloat16")).model.decode_stack is None
