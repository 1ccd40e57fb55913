"""The embedded SmolLM2 written as a GPTQ (4-bit, group 128, symmetric) and an AWQ
checkpoint, run as users meet them: `pagedllm serve <folder>` with the official
client, and offline against a float32 engine on the checkpoint's dequantized weights."""

from __future__ import annotations

import os
import signal

import openai
import pytest
from safetensors.torch import save_file

from pagedllm import LLM, SamplingParams
from pagedllm.loader.gguf_loader import gguf_hf_config, iter_gguf_weights, load_gguf_tokenizer
from tests.entrypoints.conftest import start_server
from tests.quantized_checkpoints import awq_layer, gptq_layer, write_quantized_checkpoint

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are"]
CHATS = [[{"role": "user", "content": "What is 7 times 8?"}],
         [{"role": "user", "content": "Write a haiku about the sea."}],
         [{"role": "user", "content": "Name three planets of the solar system."}],
         [{"role": "user", "content": "How do I reverse a list in Python?"}]]
NUM_TOKENS = 32
# Decode steps round activations to int8 per 32 values: only a near tie of the float
# engine may flip, and where one flips depends on float summation order. Measured on a
# Zen 5 EPYC: GPTQ 1-3 of 8 prompts agree over all 32 tokens, the others part after
# 2-31 tokens at gaps of 0.001-0.13 (170 of the 256 tokens come before a prompt's first
# divergence), AWQ 3-5 of 8 (178 of 256); a wrongly packed weight parts at once, far apart.
NEAR_TIE = 0.3
MIN_AGREEING_TOKENS = NUM_TOKENS * 8 // 3
GPTQ_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}
AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}


@pytest.fixture(scope="module")
def smollm2_float(embedded_gguf, tmp_path_factory) -> str:
    """The embedded model as a Hugging Face float32 folder (config, tokenizer, safetensors)."""
    import json

    folder = str(tmp_path_factory.mktemp("smollm2-float"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(gguf_hf_config(embedded_gguf) | {"torch_dtype": "float32"}, f)
    load_gguf_tokenizer(embedded_gguf).save_pretrained(folder)
    save_file({name: weight.contiguous() for name, weight in iter_gguf_weights(embedded_gguf)},
              os.path.join(folder, "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def smollm2_gptq(smollm2_float, tmp_path_factory) -> tuple[str, str]:
    """(GPTQ folder, float32 folder of the weights it stands for)."""
    folder = str(tmp_path_factory.mktemp("smollm2") / "gptq")
    reference = write_quantized_checkpoint(smollm2_float, folder, GPTQ_CONFIG,
                                           lambda w: gptq_layer(w, 4, 128, True, act_order=False))
    return folder, reference


def _generate(llm: LLM) -> list:
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=5)
    tokenizer = llm.get_tokenizer()
    prompts = PROMPTS + [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
                         for chat in CHATS]
    return [out.outputs[0] for out in llm.generate(prompts, params, use_tqdm=False)]


def _agreeing(quantized: list, reference: list) -> tuple[int, int]:
    """-> (prompts that agree over all tokens, tokens before each prompt's first divergence,
    summed); every divergence must be at a near tie of the reference."""
    agreeing = agreeing_tokens = 0
    for prompt, (ours, theirs) in enumerate(zip(quantized, reference)):
        ours_ids, their_ids = list(ours.token_ids), list(theirs.token_ids)
        if ours_ids == their_ids:
            agreeing += 1
            agreeing_tokens += len(ours_ids)
            continue
        step = next(i for i, (a, b) in enumerate(zip(ours_ids, their_ids)) if a != b)
        agreeing_tokens += step
        candidates = theirs.logprobs[step]
        assert ours_ids[step] in candidates, (prompt, step)
        gap = candidates[their_ids[step]].logprob - candidates[ours_ids[step]].logprob
        assert gap < NEAR_TIE, (prompt, step, gap)
    return agreeing, agreeing_tokens


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_smollm2_checkpoint_generates_what_its_dequantized_weights_do(smollm2_float, smollm2_gptq, tmp_path,
                                                                       method):
    if method == "gptq":
        folder, reference = smollm2_gptq
    else:
        folder = str(tmp_path / "awq")
        reference = write_quantized_checkpoint(smollm2_float, folder, AWQ_CONFIG, lambda w: awq_layer(w, 128))
    quantized = _generate(LLM(folder, max_model_len=512, kv_cache_memory="64MiB"))
    agreeing, agreeing_tokens = _agreeing(quantized, _generate(LLM(reference, dtype="float32", max_model_len=512,
                                                                   kv_cache_memory="64MiB")))
    print(f"{method}: {agreeing} of {len(quantized)} prompts agree over {NUM_TOKENS} tokens, "
          f"{agreeing_tokens} tokens before the first divergences")
    assert agreeing_tokens >= MIN_AGREEING_TOKENS


def test_serve_a_gptq_folder_with_the_openai_client(smollm2_gptq, tmp_path_factory):
    folder, _ = smollm2_gptq
    expected = LLM(folder, max_model_len=512, kv_cache_memory="64MiB").chat(
        CHATS[0], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0].text
    server = start_server(tmp_path_factory, [folder, "--max-model-len", "512", "--kv-cache-memory", "64MiB",
                                             "--served-model-name", "smol-gptq"], "gptq-server")
    try:
        assert "GPTQ 4-bit weights: 210 as Q4_0" in server.log
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        reply = client.chat.completions.create(model="smol-gptq", messages=CHATS[0], temperature=0, max_tokens=16)
        assert reply.choices[0].message.content == expected
        assert reply.usage.completion_tokens == 16 or reply.choices[0].finish_reason == "stop"
    finally:
        assert server.stop(signal.SIGINT) == 0
