"""SamplingParams: how one prompt is sampled. vLLM's field names and defaults."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field

# Hard caps that protect the engine from absurd requests; the server exposes
# them as flags, offline users can raise them by editing these constants.
MAX_N = 128
MAX_LOGPROBS = 20


def _check(ok: bool, name: str, allowed: str, value) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_key(key):
    """A logit_bias key as a token id: JSON gives "1234"; anything else is left for
    validation to name."""
    if isinstance(key, str) and key.strip().isdigit():
        return int(key)
    return key


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A constraint on the output, enforced token by token with a grammar: exactly
    one of the fields is set (vLLM's names).

    json: a JSON schema (dict or its JSON text): the output is JSON matching it.
    json_object: any JSON object.
    regex: the whole output matches this regular expression.
    choice: the output is exactly one of these strings.
    grammar: a context-free grammar, in GBNF/EBNF (llama.cpp's notation, `root ::= ...`)
        or Lark (`start: ...`).
    """

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    @functools.cached_property
    def grammar_source(self) -> tuple[str, str]:
        """(grammar format, text) the grammar is built from: the key of compiled grammars,
        computed once per spec (a request looks its grammar up several times)."""
        if self.json is not None:
            return "json", self.json if isinstance(self.json, str) else json.dumps(self.json)
        if self.json_object:
            return "json", '{"type": "object"}'
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(list(self.choice))
        return "grammar", self.grammar

    def __post_init__(self) -> None:
        kinds = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        kinds += ["json_object"] if self.json_object else []
        if len(kinds) != 1:
            raise ValueError("structured_outputs must set exactly one of json, json_object, regex, choice, "
                             f"grammar; got {kinds or 'none'}")
        _check(self.json is None or isinstance(self.json, (dict, str)), "structured_outputs.json",
               "a JSON schema (object or JSON text)", self.json)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, str) and value), f"structured_outputs.{name}",
                   "a non-empty string", value)
        _check(self.choice is None or (isinstance(self.choice, (list, tuple)) and self.choice
                                       and all(isinstance(c, str) and c for c in self.choice)),
               "structured_outputs.choice", "a non-empty list of non-empty strings", self.choice)


@dataclass
class SamplingParams:
    """Sampling options for one prompt.

    n: number of samples returned for the prompt (1..MAX_N); the prompt is
        computed once and its KV blocks are shared among the samples.
    temperature: 0 means greedy; otherwise logits are divided by it (0..100).
    top_p: nucleus sampling, keep the smallest set of tokens with cumulative
        probability >= top_p (0 < top_p <= 1).
    top_k: keep the k most likely tokens (0 or -1 = all).
    min_p: drop tokens whose probability is below min_p * max probability (0..1).
    seed: per-request seed; the same seed gives the same tokens whatever the
        batch, preemption or chunking.
    presence_penalty / frequency_penalty: OpenAI penalties (-2..2) on tokens
        already generated (presence: once, frequency: per occurrence).
    repetition_penalty: CTRL-style penalty (> 0, 1 = off) on tokens in the
        prompt or the output.
    max_tokens: most tokens to generate (>= 1; None = up to max_model_len).
    min_tokens: EOS and stop_token_ids are masked until this many are generated.
    stop: strings that end generation (not included in the text unless
        include_stop_str_in_output).
    stop_token_ids: token ids that end generation (included in token_ids).
    ignore_eos: keep generating past EOS (benchmarks).
    logprobs: return the log-probability of the sampled token plus the top-N
        (0..MAX_LOGPROBS); None = no logprobs.
    prompt_logprobs: same for every prompt token (the first has none).
    skip_special_tokens: drop special tokens from the detokenized text.
    logit_bias: token id -> bias in [-100, 100] added to its logit before
        sampling (-100 bans the token in practice, +100 forces it).
    allowed_token_ids: only these tokens may be sampled.
    bad_words: words never generated: each word's tokens (with and without a
        leading space) are banned as a sequence (the last token is masked when the
        ones before it were just generated).
    structured_outputs: a grammar the output must follow (StructuredOutputsParams).
    truncate_prompt_tokens: keep only the last k prompt tokens (-1: as many as
        max_model_len allows); None keeps the whole prompt.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    truncate_prompt_tokens: int | None = None
    # Filled by the engine (not user fields): EOS ids of the model, and the token id
    # sequences of bad_words.
    eos_token_ids: tuple[int, ...] = field(default=(), repr=False)
    bad_words_token_ids: tuple[tuple[int, ...], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.logit_bias is not None and isinstance(self.logit_bias, dict):
            # JSON object keys are strings: {"1234": -100} means token 1234.
            self.logit_bias = {_token_key(key): value for key, value in self.logit_bias.items()}
        self._validate()

    def _validate(self) -> None:
        _check(_is_int(self.n) and 1 <= self.n <= MAX_N, "n", f"an integer in [1, {MAX_N}]", self.n)
        _check(_is_number(self.temperature) and 0 <= self.temperature <= 100,
               "temperature", "a number in [0, 100]", self.temperature)
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]", self.top_p)
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", "-1, 0 (off) or a positive integer", self.top_k)
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "a number in [0, 1]", self.min_p)
        _check(self.seed is None or (_is_int(self.seed) and -(2**63) <= self.seed < 2**64),
               "seed", "an integer or None", self.seed)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_number(value) and -2 <= value <= 2, name, "a number in [-2, 2]", value)
        _check(_is_number(self.repetition_penalty) and 0 < self.repetition_penalty <= 100,
               "repetition_penalty", "a number in (0, 100]", self.repetition_penalty)
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
               "max_tokens", "an integer >= 1 or None", self.max_tokens)
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "an integer >= 0", self.min_tokens)
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens", f"<= max_tokens ({self.max_tokens})",
                   self.min_tokens)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "a list of non-empty strings", self.stop)
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", "a list of non-negative integers", self.stop_token_ids)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS),
                   name, f"None or an integer in [0, {MAX_LOGPROBS}]", value)

        self._validate_token_controls()

    def _validate_token_controls(self) -> None:
        _check(self.logit_bias is None or (isinstance(self.logit_bias, dict) and all(
            _is_int(k) and k >= 0 and _is_number(v) and -100 <= v <= 100 for k, v in self.logit_bias.items())),
               "logit_bias", "a map of token ids to numbers in [-100, 100]", self.logit_bias)
        _check(self.allowed_token_ids is None or (
            isinstance(self.allowed_token_ids, (list, tuple)) and self.allowed_token_ids
            and all(_is_int(t) and t >= 0 for t in self.allowed_token_ids)),
               "allowed_token_ids", "a non-empty list of non-negative integers", self.allowed_token_ids)
        _check(self.bad_words is None or (isinstance(self.bad_words, (list, tuple)) and all(
            isinstance(w, str) and w.strip() for w in self.bad_words)), "bad_words",
               "a list of non-blank strings", self.bad_words)
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
               "structured_outputs", "a StructuredOutputsParams", self.structured_outputs)
        _check(self.truncate_prompt_tokens is None or (_is_int(self.truncate_prompt_tokens) and (
            self.truncate_prompt_tokens >= 1 or self.truncate_prompt_tokens == -1)),
               "truncate_prompt_tokens", "-1, a positive integer or None", self.truncate_prompt_tokens)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def max_stop_str_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)
