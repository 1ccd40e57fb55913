"""Compare the grammar engines for structured outputs on the embedded model's tokenizer.

For llguidance and xgrammar: the one-off tokenizer set-up, compiling a JSON schema, and the
per-token cost of a constrained step (computing the next-token bitmask and accepting the
token) while walking a valid output of the schema token by token. This is what chose
pagedllm's grammar engine (docs/design.md, "Structured outputs").

    pip install llguidance xgrammar   # xgrammar is not a pagedllm dependency
    python benchmarks/grammar_backends.py
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np

from pagedllm.engine_args import EngineArgs
from pagedllm.engine.input_processor import load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "tags", "address"],
}
OUTPUT = json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["math", "engines", "poetry"],
                     "address": {"city": "London", "zip": "W1"}})


def _timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def bench_llguidance(tokenizer, vocab_size: int, token_ids: list[int]) -> dict:
    import llguidance
    import llguidance.numpy

    ll_tokenizer, setup_s = _timed(lambda: llguidance.LLTokenizer(
        tokenizer.backend_tokenizer.to_str(), n_vocab=vocab_size, eos_token=tokenizer.eos_token_id))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    matcher, compile_s = _timed(lambda: llguidance.LLMatcher(ll_tokenizer, grammar))
    bitmask = llguidance.numpy.allocate_token_bitmask(1, vocab_size)
    steps = []
    for token_id in token_ids:
        started = time.perf_counter()
        llguidance.numpy.fill_next_token_bitmask(matcher, bitmask, 0)
        assert matcher.consume_token(token_id), matcher.get_error()
        steps.append(time.perf_counter() - started)
    return {"setup_s": setup_s, "compile_s": compile_s, "steps": steps}


def bench_xgrammar(tokenizer, vocab_size: int, token_ids: list[int]) -> dict:
    import xgrammar

    info, setup_s = _timed(lambda: xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size))
    compiler = xgrammar.GrammarCompiler(info, max_threads=1)
    compiled, compile_s = _timed(lambda: compiler.compile_json_schema(json.dumps(SCHEMA)))
    matcher = xgrammar.GrammarMatcher(compiled)
    bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
    steps = []
    for token_id in token_ids:
        started = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask, 0)
        assert matcher.accept_token(token_id)
        steps.append(time.perf_counter() - started)
    return {"setup_s": setup_s, "compile_s": compile_s, "steps": steps}


def main() -> None:
    config = EngineArgs().create_engine_config()
    tokenizer = load_tokenizer(config.model)
    vocab_size = config.model.hf_config.vocab_size
    token_ids = tokenizer(OUTPUT, add_special_tokens=False).input_ids
    print(f"vocabulary {vocab_size}, walking {len(token_ids)} tokens of a valid output")
    print(f"{'engine':<11} {'tokenizer set-up':>17} {'compile schema':>15} {'step median':>12} {'step p90':>9}")
    for name, bench in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
        try:
            figures = bench(tokenizer, vocab_size, token_ids)
        except ImportError:
            print(f"{name:<11} not installed")
            continue
        steps_ms = np.array(figures["steps"]) * 1e3
        print(f"{name:<11} {figures['setup_s'] * 1e3:>14.1f} ms {figures['compile_s'] * 1e3:>12.2f} ms "
              f"{statistics.median(steps_ms):>9.3f} ms {np.percentile(steps_ms, 90):>6.3f} ms")


if __name__ == "__main__":
    main()
