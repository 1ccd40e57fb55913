"""EngineArgs: every engine option written once -- its default, choices and help.

`LLM(...)`'s keyword arguments are its fields, the engine flags of `pagedllm serve`,
`generate` and `bench throughput` are made from them (`add_cli_args`), and
`create_engine_config` turns them into the validated EngineConfig. A new option is one
field here (plus whichever config takes it).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pagedllm.config import (DEFAULT_MODEL_ALIAS, DTYPES, KV_CACHE_DTYPES, QUANTIZATIONS, CacheConfig,
                             EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig, parse_memory_size)


def _option(default: Any, help: str, *, flags: tuple[str, ...] = (), choices: tuple[str, ...] | None = None,
            cli_type: type | None = None, action: str | None = None) -> Any:
    """A field with its command-line form: flags (default --field-name), choices, the type
    argparse parses, or a store_true / store_false action."""
    return field(default=default, metadata={"help": help, "flags": flags, "choices": choices,
                                            "cli_type": cli_type, "action": action})


@dataclass
class EngineArgs:
    model: str | None = _option(None, f"Hugging Face model folder, .gguf file or alias (default: {DEFAULT_MODEL_ALIAS})")
    dtype: str = _option(
        "auto", "weights/activations dtype; auto = checkpoint dtype, 16-bit runs as bfloat16 on CUDA; a CPU with "
        "native bfloat16 times both and takes the faster; other CPUs float32; with --quantization (or a GPTQ/AWQ checkpoint): float32",
        choices=DTYPES)
    quantization: str | None = _option(
        None, "gguf: run a .gguf file's quantized matrices (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) without "
        "dequantizing them (CPU; other types are dequantized); default: dequantize at load. gptq, awq: a Hugging "
        "Face checkpoint's 4-bit (GPTQ, AWQ) or 8-bit (GPTQ) weights, run on the same kernels (CPU); chosen by "
        "itself from the checkpoint's quantization_config",
        flags=("-q", "--quantization"), choices=QUANTIZATIONS)
    device: str = _option("auto", "where the model runs", choices=("auto", "cpu", "cuda"))
    max_model_len: int | None = _option(
        None, "longest prompt + completion in tokens (default: the model's context length)", cli_type=int)
    kv_cache_memory: float | int | str | None = _option(
        None, "KV pool size in GiB (e.g. 4 or 0.5) or with a unit ('512MiB'); default min(4 GiB, 25%% of available "
        "memory) on CPU, 90%% of free memory on CUDA")
    num_kv_blocks: int | None = _option(None, "exact KV pool size in blocks (overrides)", cli_type=int)
    block_size: int = _option(16, "tokens per KV block", cli_type=int)
    kv_cache_dtype: str = _option(
        "auto", "how K/V are stored; auto = the model's dtype. float16 with a float32 model halves KV memory (twice "
        "the tokens fit) and the bytes decode attention reads", choices=KV_CACHE_DTYPES)
    max_num_seqs: int = _option(256, "most requests in one step", cli_type=int)
    max_num_batched_tokens: int | None = _option(
        None, "token budget of one step (default 2048 on CPU, 8192 on CUDA)", cli_type=int)
    enable_prefix_caching: bool = _option(True, "turn off prefix caching", flags=("--no-enable-prefix-caching",),
                                          action="store_false")
    seed: int = _option(0, "engine seed", cli_type=int)
    generation_config: str = _option(
        "auto", "default sampling parameters (temperature, top_p, top_k, min_p, repetition_penalty, "
        "max_new_tokens): auto = the model folder's generation_config.json, vllm = none (pagedllm's own defaults), "
        "or a folder holding a generation_config.json; a request's own fields override them")
    skip_tokenizer_init: bool = _option(
        False, "load no tokenizer (for a model folder without one): prompts must be token ids, outputs carry token "
        "ids and no text; stop strings, bad_words, structured outputs and chat are refused. For bench throughput "
        "(serve refuses it; generate's prompt is text)", action="store_true")
    tensor_parallel_size: int = _option(
        1, "split the model across this many worker processes (one rank each)",
        flags=("-tp", "--tensor-parallel-size"), cli_type=int)
    distributed_executor_backend: str = _option(
        "mp", "how the ranks run with -tp > 1, and the engine cores with serve -dp > 1: local processes (mp) or "
        "Ray actors, possibly on several machines (ray; needs pip install pagedllm[ray])", choices=("mp", "ray"))
    data_parallel_size: int = _option(
        1, "serve with this many engine cores, each a whole copy of the model (with its own -tp ranks) and its own "
        "KV cache, in a process of its own on this machine (the CPU cores are shared among them) or, with "
        "--distributed-executor-backend ray, in a Ray actor wherever the cluster has room; requests go to the "
        "replica holding the longest cached prefix of their prompt unless it is much busier. pagedllm serve only",
        flags=("-dp", "--data-parallel-size"), cli_type=int)

    def create_engine_config(self) -> EngineConfig:
        """Validated configs; a bad value raises ValueError naming it."""
        model_config = ModelConfig.create(self.model, self.dtype, self.device, self.max_model_len, self.seed,
                                          self.generation_config, self.skip_tokenizer_init, self.quantization)
        cache = CacheConfig(self.block_size, parse_memory_size(self.kv_cache_memory), self.num_kv_blocks,
                            self.enable_prefix_caching, self.kv_cache_dtype)
        max_num_batched_tokens = self.max_num_batched_tokens
        if max_num_batched_tokens is None:
            # Large enough to prefill several prompts per step; chunking handles the rest.
            max_num_batched_tokens = 2048 if model_config.device == "cpu" else 8192
        scheduler = SchedulerConfig(self.max_num_seqs, max_num_batched_tokens, model_config.max_model_len)
        return EngineConfig(model_config, cache, scheduler,
                            ParallelConfig(self.tensor_parallel_size, self.distributed_executor_backend,
                                           self.data_parallel_size))

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """The MODEL positional and an "engine" group of flags, one per field."""
        group = parser.add_argument_group("engine")
        for option in dataclasses.fields(cls):
            meta = option.metadata
            if option.name == "model":
                parser.add_argument("model", nargs="?", default=None, help=meta["help"])
                continue
            flags = meta["flags"] or (f"--{option.name.replace('_', '-')}",)
            kwargs: dict[str, Any] = {"dest": option.name, "default": option.default, "help": meta["help"]}
            if meta["action"]:
                kwargs["action"] = meta["action"]
            else:
                kwargs |= {"choices": meta["choices"], "type": meta["cli_type"]}
            group.add_argument(*flags, **kwargs)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        return cls(**{option.name: getattr(args, option.name) for option in dataclasses.fields(cls)})
