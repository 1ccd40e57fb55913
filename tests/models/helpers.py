"""Shared checks for the model-family tests: tiny configs, prompts, a pagedllm
engine set up to chunk prefills and cross block boundaries, and the comparison
of its greedy tokens and logprobs with a reference forward pass."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
from safetensors.torch import save_file

from pagedllm import LLM, SamplingParams
from tests.tiny_models import TINY_VOCAB_SIZE, hf_greedy, save_byte_tokenizer, save_tiny_model

NUM_STEPS = 32
BLOCK_SIZE = 4  # prompts and outputs span many blocks
MAX_BATCHED_TOKENS = 16  # every prompt but the shortest is prefilled in chunks
# Different lengths, none a multiple of the block size; the longest is chunked 3 times.
PROMPT_LENGTHS = (7, 21, 38)
MAX_POSITIONS = 128  # > longest prompt + NUM_STEPS
LOGPROB_ATOL = 1e-4  # float32 on both sides


def tiny_kwargs(**overrides) -> dict:
    """Common tiny dims for transformers configs (hidden 64, 2 layers, GQA 4/2)."""
    kwargs = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
                  tie_word_embeddings=False, attn_implementation="eager")
    kwargs.update(overrides)
    return kwargs


def save_hf_model(folder, model_class, config, seed: int = 0, **save_kwargs) -> torch.nn.Module:
    """save_tiny_model, with the norm weights perturbed too (so that a norm
    applied in the wrong place or with the wrong offset shows), in float32."""
    model = save_tiny_model(str(folder), model_class, config, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(str(folder), **save_kwargs)
    return model


def make_prompts(lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    """Random byte-token ids (3..258: no special tokens)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 259, (n,), generator=generator).tolist() for n in lengths]


def engine_and_reference(tmp_path_factory, name: str, model_class, config) -> tuple[LLM, torch.nn.Module]:
    """A tiny checkpoint of `config` saved under a fresh folder: (pagedllm engine, HF model)."""
    folder = tmp_path_factory.mktemp(name)
    hf_model = save_hf_model(folder, model_class, config)
    return make_llm(folder), hf_model


def make_llm(folder) -> LLM:
    return LLM(str(folder), dtype="float32", num_kv_blocks=128, block_size=BLOCK_SIZE,
               max_num_batched_tokens=MAX_BATCHED_TOKENS)


def hf_logits_fn(hf_model) -> Callable[[list[int]], torch.Tensor]:
    """token ids -> logits [len, vocab] of one full transformers forward pass."""
    def logits(token_ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return hf_model(torch.tensor([token_ids])).logits[0].float()
    return logits


def assert_matches_reference(llm: LLM, reference: torch.nn.Module | Callable[[list[int]], torch.Tensor],
                             prompts: list[list[int]], num_steps: int = NUM_STEPS,
                             logprob_atol: float = LOGPROB_ATOL, near_tie: float = 0.0) -> None:
    """Generate greedily with pagedllm (all prompts in one batch) and compare with
    the reference: a transformers model, or a function token ids -> logits.

    The reference runs once on prompt + generated tokens: at every step
    pagedllm's token must be its argmax, and pagedllm's top-5 logprobs must
    match its log-softmax. A transformers model must also produce the same
    tokens for the first prompt with its own greedy loop over its KV cache
    (slow on CPU, and equivalent to the argmax check). near_tie > 0 accepts, instead, any
    token whose reference logprob is within near_tie of the best (kernels that round
    their inputs, such as int8 activations, may take either side of a near tie)."""
    params = SamplingParams(temperature=0, max_tokens=num_steps, ignore_eos=True, logprobs=5)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    is_model = isinstance(reference, torch.nn.Module)
    reference_logits = hf_logits_fn(reference) if is_model else reference
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        tokens = list(output.outputs[0].token_ids)
        where = f"prompt of {len(prompt)} tokens"
        assert len(tokens) == num_steps, where
        ref = torch.log_softmax(reference_logits(prompt + tokens), dim=-1)[len(prompt) - 1:-1]
        if near_tie:  # a token within near_tie of the reference's best is accepted
            gaps = ref.max(dim=-1).values - ref[torch.arange(len(tokens)), torch.tensor(tokens)]
            assert (gaps <= near_tie).all(), f"{where}: tokens {tokens}, logprob gaps to the argmax {gaps.tolist()}"
        else:
            _assert_same_tokens(tokens, ref.argmax(dim=-1).tolist(), where)
            if is_model and i == 0:
                _assert_same_tokens(tokens, hf_greedy(reference, prompt, num_steps), f"{where}, transformers greedy")
        for step, (token_logprobs, ref_step) in enumerate(zip(output.outputs[0].logprobs, ref)):
            top = sorted(token_logprobs.items(), key=lambda item: item[1].rank)
            ids = torch.tensor([token_id for token_id, _ in top])
            values = torch.tensor([lp.logprob for _, lp in top])
            torch.testing.assert_close(values, ref_step[ids], atol=logprob_atol, rtol=0,
                                       msg=lambda m: f"{where}, step {step}: {m}")
            torch.testing.assert_close(values[:5], ref_step.topk(5).values, atol=logprob_atol, rtol=0,
                                       msg=lambda m: f"{where}, step {step}, top-5: {m}")


def _assert_same_tokens(tokens: list[int], expected: list[int], where: str) -> None:
    if tokens != expected:
        step = next(i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b)
        raise AssertionError(f"{where}: greedy tokens differ from step {step}: {tokens[step:]} != {expected[step:]}")


def save_converted_checkpoint(folder, state_dict: dict[str, torch.Tensor], config: dict) -> str:
    """A checkpoint in another family's published layout: safetensors, its
    config.json, and the byte tokenizer."""
    os.makedirs(folder, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in state_dict.items()},
              os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_byte_tokenizer(str(folder))
    return str(folder)
