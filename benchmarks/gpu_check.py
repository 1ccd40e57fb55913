"""GPU check (run on a CUDA machine): the engine with the Triton backend against
transformers, then throughput on a workload against transformers static batching.

Uses a random-weight checkpoint with SmolLM2-135M's shape (written here; no
download), so it runs where the embedded GGUF is not installed:

    python benchmarks/gpu_check.py --workload path/to/workload_w.json --out results/
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.bench.hf_baseline import run_hf_baseline  # noqa: E402
from pagedllm.bench.throughput import run_throughput  # noqa: E402
from pagedllm.bench.workload import load_workload  # noqa: E402
from tests.tiny_models import hf_greedy, save_tiny_model  # noqa: E402

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                     rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
                     eos_token_id=2)


def check_greedy(folder: str, model: LlamaForCausalLM) -> dict:
    prompts = [[1, 5, 7, 9, 11] * 7, list(range(100, 400)), [17, 2000, 3000]]
    expected = [hf_greedy(model, p, 24) for p in prompts]
    llm = LLM(folder, dtype="float32", device="cuda", kv_cache_memory=1, max_model_len=1024)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                         use_tqdm=False)]
    return {"greedy_equal_to_transformers": got == expected, "got": got, "expected": expected}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--hf-batch-size", type=int, default=32)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    folder = os.path.join(args.out, "smollm2-shape-random")
    model = save_tiny_model(folder, LlamaForCausalLM, LlamaConfig(**SMOLLM2_SHAPE))
    report = {"device": torch.cuda.get_device_name(), "greedy": check_greedy(folder, model)}
    print(json.dumps(report["greedy"]["greedy_equal_to_transformers"]), flush=True)
    del model
    requests = load_workload(args.workload)
    started = time.time()
    report["pagedllm"] = run_throughput(requests, model=folder, dtype=args.dtype, device="cuda",
                                        kv_cache_memory=8, max_model_len=2048)
    report["hf"] = run_hf_baseline(folder, requests, args.hf_batch_size, args.dtype, "cuda")
    report["ratio_output_tok_s"] = report["pagedllm"]["output_tokens_per_s"] / report["hf"]["output_tokens_per_s"]
    report["wall_s"] = time.time() - started
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(json.dumps({k: report[k] for k in ("device", "ratio_output_tok_s")}, indent=1))
    for side in ("pagedllm", "hf"):
        print(side, {k: report[side][k] for k in ("output_tokens_per_s", "total_tokens_per_s", "elapsed_s")})


if __name__ == "__main__":
    main()
