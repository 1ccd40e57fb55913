"""EngineArgs: the one definition of the engine options, its CLI flags and LLM keywords."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from pagedllm import LLM
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.engine_args import EngineArgs


def _parse(argv: list[str]) -> EngineArgs:
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    return EngineArgs.from_cli_args(parser.parse_args(argv))


def test_no_flags_give_the_defaults_of_llm():
    assert _parse([]) == EngineArgs()


def test_every_field_has_a_flag():
    argv = ["some/model", "--dtype", "bfloat16", "-q", "gguf", "--device", "cpu", "--max-model-len", "512",
            "--kv-cache-memory", "0.5", "--num-kv-blocks", "64", "--block-size", "8", "--kv-cache-dtype", "float16",
            "--max-num-seqs", "4", "--max-num-batched-tokens", "128", "--no-enable-prefix-caching", "--seed", "7",
            "--generation-config", "vllm", "--skip-tokenizer-init", "-tp", "2",
            "--distributed-executor-backend", "ray", "-dp", "3"]
    parsed = _parse(argv)
    assert parsed == EngineArgs(
        model="some/model", dtype="bfloat16", quantization="gguf", device="cpu", max_model_len=512,
        kv_cache_memory="0.5", num_kv_blocks=64, block_size=8, kv_cache_dtype="float16", max_num_seqs=4,
        max_num_batched_tokens=128, enable_prefix_caching=False, seed=7, generation_config="vllm",
        skip_tokenizer_init=True, tensor_parallel_size=2, distributed_executor_backend="ray", data_parallel_size=3)
    defaults = EngineArgs()
    assert all(getattr(parsed, f.name) != getattr(defaults, f.name) for f in dataclasses.fields(EngineArgs))


def test_a_bad_choice_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        _parse(["--quantization", "bitsandbytes"])
    assert "invalid choice: 'bitsandbytes'" in capsys.readouterr().err


def test_an_unknown_llm_keyword_names_itself():
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_num_sequences'"):
        LLM(max_num_sequences=4)


def test_the_offline_engine_refuses_data_parallel():
    config = EngineArgs(data_parallel_size=2).create_engine_config()
    with pytest.raises(ValueError, match="served by `pagedllm serve --data-parallel-size N`"):
        LLMEngine(config)
