"""A Llama-3-8B-shaped GGUF of random quantized weights, run with quantization="gguf":
does an 8B model load and generate on a 2-core, 24 GiB machine, in how much memory, how fast?

The file is written once to --path (4.3 GiB in Q4_0, 8.0 GiB in Q8_0; never committed)
by the gguf package's writer, one tensor at a time, from random blocks whose float16
scales are those of a trained weight (values of ~0.02). Its vocabulary is placeholder
strings (llama.cpp needs one: `llama-bench -m FILE -t 2 -p 16 -n 16` runs the same file),
so the engine runs with skip_tokenizer_init and token-id prompts. The engine runs in a child
process so that its peak RSS is its own; it reports load time, peak RSS, the time of a
16-token prompt and its first token (best of 3), and batch-1 decode tokens/s (the time of
--output-len more tokens). Outputs are meaningless (random weights).

    python benchmarks/synthetic_8b_gguf.py [--path FILE] [--type Q4_0|Q8_0] [--output-len 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

# Llama-3-8B (config.json of meta-llama/Meta-Llama-3-8B)
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 4096, 14336, 32, 32, 8, 128256
HEAD_DIM = HIDDEN // HEADS
BLOCK_BYTES = {"Q4_0": 18, "Q8_0": 34}  # per 32 values; the float16 scale is each block's first 2 bytes


def _random_blocks(rows: int, cols: int, qtype: str, rng: np.random.Generator) -> np.ndarray:
    blocks = rng.integers(0, 256, (rows, cols // 32, BLOCK_BYTES[qtype]), dtype=np.uint8)
    # q ranges over [-8, 7] (Q4_0) or [-128, 127] (Q8_0): scales giving values of ~0.02
    scale = 0.005 if qtype == "Q4_0" else 0.0003
    scales = rng.uniform(0.5 * scale, 1.5 * scale, (rows, cols // 32)).astype(np.float16)
    blocks[..., :2] = scales.view(np.uint8).reshape(rows, cols // 32, 2)
    return blocks.reshape(rows, -1)


def write_model(path: str, qtype: str) -> None:
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(8192)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(500000.0)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(VOCAB)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    # a placeholder vocabulary, so that llama.cpp (which needs one) runs the same file
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, VOCAB)])
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (VOCAB - 3))
    matrices = [("token_embd.weight", VOCAB, HIDDEN), ("output.weight", VOCAB, HIDDEN)]
    for i in range(LAYERS):
        matrices += [(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN), (f"blk.{i}.attn_k.weight", KV_HEADS * HEAD_DIM, HIDDEN),
                     (f"blk.{i}.attn_v.weight", KV_HEADS * HEAD_DIM, HIDDEN),
                     (f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN),
                     (f"blk.{i}.ffn_gate.weight", INTERMEDIATE, HIDDEN), (f"blk.{i}.ffn_up.weight", INTERMEDIATE, HIDDEN),
                     (f"blk.{i}.ffn_down.weight", HIDDEN, INTERMEDIATE)]
    norms = ["output_norm.weight"] + [f"blk.{i}.{n}.weight" for i in range(LAYERS) for n in ("attn_norm", "ffn_norm")]
    for name, rows, cols in matrices:
        writer.add_tensor_info(name, (rows, cols // 32 * BLOCK_BYTES[qtype]), np.dtype(np.uint8),
                               rows * cols // 32 * BLOCK_BYTES[qtype], raw_dtype=kind)
    for name in norms:
        writer.add_tensor_info(name, (HIDDEN,), np.dtype(np.float32), HIDDEN * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for _, rows, cols in matrices:
        writer.write_tensor_data(_random_blocks(rows, cols, qtype, rng))
    for _ in norms:
        writer.write_tensor_data(np.ones(HIDDEN, dtype=np.float32))
    writer.close()


_ENGINE = """
import json, resource, sys, time
started = time.time()
from pagedllm import LLM, SamplingParams
llm = LLM(sys.argv[1], quantization="gguf", skip_tokenizer_init=True, max_model_len=512, kv_cache_memory="256MiB")
loaded = time.time()
prompt = {"prompt_token_ids": list(range(100, 116))}
def timed(max_tokens):
    t0 = time.time()
    llm.generate(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    return time.time() - t0
prefill = min(timed(1) for _ in range(3))  # the prompt and the first token
n = int(sys.argv[2])
decode = timed(n + 1) - prefill
print(json.dumps({"load_s": loaded - started, "prefill_16_tokens_s": prefill, "decode_tok_per_s": n / decode,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default="/tmp/llama3-8b-shaped.gguf")
    parser.add_argument("--type", default="Q4_0", choices=sorted(BLOCK_BYTES))
    parser.add_argument("--output-len", type=int, default=16)
    args = parser.parse_args()
    path = args.path.replace(".gguf", f"-{args.type.lower()}.gguf")
    if not os.path.isfile(path):
        started = time.time()
        write_model(path, args.type)
        print(f"wrote {path} in {time.time() - started:.0f} s")
    result = subprocess.run([sys.executable, "-c", _ENGINE, path, str(args.output_len)], capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        sys.exit(result.stderr)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["file_gib"] = os.path.getsize(path) / 2**30
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
