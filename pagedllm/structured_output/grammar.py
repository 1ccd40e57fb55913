"""Grammars for structured outputs: compiled once per spec, one matcher per request.

llguidance does the work (chosen over xgrammar by benchmarks/grammar_backends.py: a
schema compiles ~6x faster, a constrained step costs ~0.03 ms against a model step of
tens of ms, and the wheel has no dependencies). A spec (JSON schema, regex, choice,
grammar) becomes an llguidance grammar, validated against the tokenizer under resource
limits, so a hostile schema is refused with a ValueError instead of stalling the engine.
The validated matcher is kept in an LRU cache by spec; each request deep-copies it.

Token masks are bitmasks: int32 [rows, ceil(vocab / 32)], bit j of word i allows token
32 * i + j. The engine core fills one row per constrained request that samples this
step; the sampler applies them (pagedllm/layers/sampler.py).

This module imports no torch: it runs next to the scheduler.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import numpy as np

from pagedllm.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# Longest spec (schema JSON, regex, grammar, choices) accepted, in characters.
MAX_SPEC_CHARS = 64 * 1024
# llguidance's parser limits. Fuel is llguidance's work unit (~50k/ms when building the
# lexer, ~14k/ms per mask step): compiling is bounded to ~20 ms of lexer work and a mask
# step to ~15 ms, whatever the grammar. verbose_errors off: messages go back to clients
# and must not echo parser internals.
PARSER_LIMITS = dict(initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000, max_lexer_states=50_000,
                     max_grammar_size=100_000, verbose_errors=False)
# Compiled grammars kept.
CACHE_SIZE = 256
# JSON is written without free whitespace: a small model could otherwise emit newlines
# forever inside an object, and a finite schema would not bound the output.
JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarMatcher:
    """One request's position in its grammar: accepts sampled tokens, fills masks."""

    def __init__(self, matcher) -> None:
        self._matcher = matcher

    def accept_token(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            # Only a token the mask did not allow gets here (the request is then ended).
            logger.warning("structured output: token %d rejected: %s", token_id, self._matcher.get_error())

    def is_terminated(self) -> bool:
        """Nothing but EOS can follow (the grammar is complete), or the matcher failed."""
        return self._matcher.is_stopped()

    def fill_next_token_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        """Write the tokens allowed next into bitmask[row] (int32 [rows, words])."""
        import llguidance.numpy

        llguidance.numpy.fill_next_token_bitmask(self._matcher, bitmask, row)


class CompiledGrammar:
    def __init__(self, matcher) -> None:
        self._pristine = matcher  # never advanced: the template of every request's matcher

    def new_matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._pristine.deep_copy())


class GrammarCompiler:
    """Specs -> compiled grammars for one tokenizer; thread-safe (the server compiles
    in worker threads while the engine thread reads the cache)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_token_ids = list(eos_token_ids)
        self._ll_tokenizer = None
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """Raises ValueError naming what is wrong with the spec."""
        try:
            key = spec.grammar_source
        except RecursionError:
            raise ValueError("structured_outputs.json is nested too deeply") from None
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        compiled = CompiledGrammar(self._build_matcher(*key))
        with self._lock:
            self._cache[key] = compiled
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _build_matcher(self, kind: str, text: str):
        import llguidance

        field = {"json": "structured_outputs.json", "regex": "structured_outputs.regex",
                 "choice": "structured_outputs.choice", "grammar": "structured_outputs.grammar"}[kind]
        if len(text) > MAX_SPEC_CHARS:
            raise ValueError(f"{field} is too long: {len(text)} characters, the limit is {MAX_SPEC_CHARS}")
        try:
            if kind == "json":
                grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
            else:
                grammar = llguidance.grammar_from(kind, text)
        except ValueError as error:
            raise ValueError(f"{field} is invalid: {error}") from None
        limits = llguidance.LLParserLimits(**PARSER_LIMITS)
        matcher = llguidance.LLMatcher(self._tokenizer(), grammar, log_level=0, limits=limits)
        if matcher.is_error():
            raise ValueError(f"{field} is invalid or too complex: {matcher.get_error()}")
        return matcher

    def prepare(self) -> None:
        """Build llguidance's view of the vocabulary now. It holds the GIL for ~0.5 s (50k
        tokens), which would stall the engine thread under the first structured request: the
        server pays it at start-up instead. A tokenizer llguidance cannot read only costs the
        structured requests (each is refused with the reason), not the start-up."""
        try:
            self._tokenizer()
        except ValueError as error:
            logger.warning("structured outputs are unavailable with this model: %s", error)

    def _tokenizer(self):
        """llguidance's view of the vocabulary, built on first use."""
        import llguidance

        with self._lock:
            if self._ll_tokenizer is None:
                backend = getattr(self._hf_tokenizer, "backend_tokenizer", None)
                if backend is None:
                    raise ValueError("structured outputs need a fast (tokenizers-backed) tokenizer")
                try:
                    self._ll_tokenizer = llguidance.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size,
                                                                eos_token=self._eos_token_ids)
                except Exception as error:  # llguidance's own error types: the request gets the reason
                    raise ValueError(f"structured outputs cannot read this model's tokenizer: {error}") from None
            return self._ll_tokenizer


def fill_bitmask(matchers: list[GrammarMatcher], vocab_size: int) -> np.ndarray:
    """The next-token masks of `matchers`: int32 [len(matchers), ceil(vocab_size / 32)]."""
    bitmask = np.empty((len(matchers), -(-vocab_size // 32)), np.int32)
    for row, matcher in enumerate(matchers):
        matcher.fill_next_token_bitmask(bitmask, row)
    return bitmask
