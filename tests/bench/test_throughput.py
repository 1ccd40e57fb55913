"""`bench throughput` on a tiny checkpoint: token counts, rates and KV waste add up;
--structured-share constrains exactly the chosen requests."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from pagedllm.bench.throughput import (DEFAULT_STRUCTURED_SCHEMA, add_throughput_parser, load_schema,
                                       run_throughput, structured_indices)
from pagedllm.bench.workload import BenchRequest
from tests.tiny_models import TINY_VOCAB_SIZE, save_tiny_model

# Finite: a random model completes it in ~12 tokens.
BOOLEAN_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny-llama"))
    config = LlamaConfig(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    save_tiny_model(folder, LlamaForCausalLM, config)
    return folder


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pagedllm bench")
    add_throughput_parser(parser.add_subparsers(dest="bench_command", required=True))
    return parser.parse_args(argv)


def test_throughput_counts_and_rates(tiny_model_dir):
    requests = [BenchRequest([5] * 10, 7), BenchRequest(list(range(20, 53)), 3), BenchRequest([9, 8], 12)]
    result = run_throughput(requests, model=tiny_model_dir, dtype="float32", num_kv_blocks=64, block_size=4)
    assert (result["num_requests"], result["prompt_tokens"], result["output_tokens"]) == (3, 45, 22)
    assert result["requests_per_s"] == pytest.approx(3 / result["elapsed_s"])
    assert result["total_tokens_per_s"] == pytest.approx(67 / result["elapsed_s"])
    # Only partial last blocks are unfilled: at most block_size - 1 slots per running request.
    assert 0 < result["kv_cache_waste"] < 0.5
    assert result["num_steps"] >= 12  # the longest request needs 12 decode steps
    assert (result["dtype"], result["kv_cache_dtype"], result["label"]) == ("float32", "float32", "pagedllm float32")


def test_structured_indices_spread_the_share_evenly():
    assert structured_indices(8, 0.0) == set() and structured_indices(8, 1.0) == set(range(8))
    assert structured_indices(8, 0.5) == {0, 2, 4, 6}
    assert structured_indices(8, 0.25) == {1, 5}
    assert len(structured_indices(128, 0.3)) == round(128 * 0.3)
    with pytest.raises(ValueError, match="share"):
        structured_indices(4, 1.5)


def test_load_schema_inline_or_file(tmp_path):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(BOOLEAN_SCHEMA))
    assert load_schema(str(path)) == load_schema(json.dumps(BOOLEAN_SCHEMA)) == BOOLEAN_SCHEMA
    for text, message in [("[1]", "neither"), (str(tmp_path / "missing.json"), "neither"), ("{x", "not valid JSON")]:
        with pytest.raises(ValueError, match=message):
            load_schema(text)


def test_structured_share_constrains_exactly_the_chosen_requests(tiny_model_dir, monkeypatch):
    from pagedllm.engine.llm_engine import LLMEngine

    # Every request's params and streamed text, as the engine saw them.
    params, texts = {}, defaultdict(str)
    add, step = LLMEngine.add_tokenized_request, LLMEngine.step

    def spy_add(self, request_id, prompt, token_ids, sampling_params, **kwargs):
        params[request_id] = sampling_params
        return add(self, request_id, prompt, token_ids, sampling_params, **kwargs)

    def spy_step(self):
        outputs = step(self)
        for output in outputs:
            texts[output.request_id] += output.outputs[0].text
        return outputs

    monkeypatch.setattr(LLMEngine, "add_tokenized_request", spy_add)
    monkeypatch.setattr(LLMEngine, "step", spy_step)
    requests = [BenchRequest([40 + i] * 6, 30) for i in range(4)]
    result = run_throughput(requests, structured_share=0.5, structured_schema=BOOLEAN_SCHEMA, model=tiny_model_dir,
                            dtype="float32", num_kv_blocks=64, block_size=4)
    constrained = {str(i) for i in structured_indices(4, 0.5)}
    assert {r for r, p in params.items() if p.structured_outputs is not None} == constrained == {"0", "2"}
    for request_id in constrained:
        assert set(json.loads(texts[request_id])) == {"ok"}  # the grammar completed: the request ended early
    assert (result["structured_share"], result["num_structured_requests"]) == (0.5, 2)
    assert result["label"] == "pagedllm float32, structured 0.5"
    assert result["mean_output_len_unstructured"] == 30 and result["mean_output_len_structured"] < 30
    assert result["output_tokens"] == 60 + 2 * result["mean_output_len_structured"] < result["requested_output_tokens"]


def test_default_schema_lets_constrained_requests_run_their_length(tiny_model_dir):
    result = run_throughput([BenchRequest([7, 8, 9], 40)], structured_share=1.0, model=tiny_model_dir,
                            dtype="float32", num_kv_blocks=64, block_size=4)
    assert result["num_structured_requests"] == 1 and result["mean_output_len_structured"] == 40
    assert result["structured_schema"] == DEFAULT_STRUCTURED_SCHEMA


def test_throughput_command_reports_the_share(tiny_model_dir, tmp_path, capsys):
    out_json = tmp_path / "result.json"
    args = parse(["throughput", tiny_model_dir, "--dtype", "float32", "--num-kv-blocks", "64", "--block-size", "4",
                  "--random-input-len", "5", "--random-output-len", "6", "--num-prompts", "4",
                  "--random-vocab-size", "200", "--structured-share", "0.25", "--json", str(out_json)])
    args.func(args)
    printed = capsys.readouterr().out
    assert "Structured share (requests):" in printed and "0.25 (1)" in printed
    assert "Mean output len, structured:" in printed
    result = json.loads(out_json.read_text())
    assert result["structured_share"] == 0.25 and result["num_structured_requests"] == 1
    args = parse(["throughput", "--structured-schema", "{}", "--random-input-len", "5", "--random-output-len", "6",
                  "--num-prompts", "4"])
    with pytest.raises(SystemExit, match="needs --structured-share"):
        args.func(args)
