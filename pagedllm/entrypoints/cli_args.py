"""The engine's command-line flags: the options of `LLM(...)`, shared by `pagedllm serve`,
`pagedllm generate` and `pagedllm bench throughput`.

A module of its own so that the server and the benchmarks take the flags without
importing the `pagedllm` command, which imports them.
"""

from __future__ import annotations

import argparse

from pagedllm.config import DEFAULT_MODEL_ALIAS, DTYPES, KV_CACHE_DTYPES, QUANTIZATIONS


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The options of `LLM(...)` as flags, and the MODEL positional."""
    parser.add_argument("model", nargs="?", default=None,
                        help=f"Hugging Face model folder, .gguf file or alias (default: {DEFAULT_MODEL_ALIAS})")
    group = parser.add_argument_group("engine")
    group.add_argument("--dtype", default="auto", choices=DTYPES,
                       help="weights/activations dtype; auto = checkpoint dtype, 16-bit runs as bfloat16 on "
                            "CUDA; a CPU with native bfloat16 times both and takes the faster; other CPUs "
                            "float32; --quantization gguf: float32")
    group.add_argument("-q", "--quantization", default=None, choices=QUANTIZATIONS,
                       help="gguf: run a .gguf file's quantized matrices (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) without "
                            "dequantizing them (CPU; other types are dequantized); default: dequantize at load")
    group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    group.add_argument("--max-model-len", type=int, default=None,
                       help="longest prompt + completion in tokens (default: the model's context length)")
    group.add_argument("--kv-cache-memory", default=None,
                       help="KV pool size in GiB (e.g. 4 or 0.5) or with a unit ('512MiB'); "
                            "default min(4 GiB, 25%% of available memory) on CPU, 90%% of free memory on CUDA")
    group.add_argument("--num-kv-blocks", type=int, default=None, help="exact KV pool size in blocks (overrides)")
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    group.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                       help="how K/V are stored; auto = the model's dtype. float16 with a float32 model "
                            "halves KV memory (twice the tokens fit) and the bytes decode attention reads")
    group.add_argument("--max-num-seqs", type=int, default=256, help="most requests in one step")
    group.add_argument("--max-num-batched-tokens", type=int, default=None,
                       help="token budget of one step (default 2048 on CPU, 8192 on CUDA)")
    group.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                       help="turn off prefix caching")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--generation-config", default="auto",
                       help="default sampling parameters (temperature, top_p, top_k, min_p, repetition_penalty, "
                            "max_new_tokens): auto = the model folder's generation_config.json, vllm = none "
                            "(pagedllm's own defaults), or a folder holding a generation_config.json; a "
                            "request's own fields override them")
    group.add_argument("--skip-tokenizer-init", action="store_true",
                       help="load no tokenizer (for a model folder without one): prompts must be token ids, "
                            "outputs carry token ids and no text; stop strings, bad_words, structured outputs "
                            "and chat are refused. For bench throughput (serve refuses it; generate's prompt is text)")
    group.add_argument("-tp", "--tensor-parallel-size", type=int, default=1,
                       help="split the model across this many worker processes (one rank each)")
    group.add_argument("--distributed-executor-backend", default="mp", choices=("mp", "ray"),
                       help="how the ranks run with -tp > 1: local processes (mp) or Ray actors, "
                            "possibly on several machines (ray; needs pip install pagedllm[ray])")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The `LLM(...)` keyword arguments given by add_engine_args' flags."""
    return dict(model=args.model, dtype=args.dtype, device=args.device, seed=args.seed,
                max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory,
                num_kv_blocks=args.num_kv_blocks, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                enable_prefix_caching=args.enable_prefix_caching, kv_cache_dtype=args.kv_cache_dtype,
                tensor_parallel_size=args.tensor_parallel_size,
                distributed_executor_backend=args.distributed_executor_backend,
                generation_config=args.generation_config, skip_tokenizer_init=args.skip_tokenizer_init,
                quantization=args.quantization)
