"""Prompts and chat messages -> validated token ids and per-request SamplingParams."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Union

from pagedllm.config import ModelConfig
from pagedllm.sampling_params import SamplingParams
from pagedllm.structured_output.grammar import GrammarCompiler

# A prompt is text, or a dict {"prompt": text} or {"prompt_token_ids": [...]} (optionally
# with "prompt" too), either optionally with "cache_salt" (see validate_cache_salt).
PromptInput = Union[str, dict[str, Any]]


def validate_cache_salt(cache_salt: Any) -> str | None:
    """vLLM's cache_salt: None, or a non-empty string mixed into the prefix-cache hash of
    the request's blocks, so that only requests with the same salt share them."""
    if cache_salt is not None and not (isinstance(cache_salt, str) and cache_salt):
        raise ValueError(f"cache_salt must be a non-empty string (or absent), got {cache_salt!r}")
    return cache_salt


def load_tokenizer(model_config: ModelConfig):
    """The model's Hugging Face tokenizer (for GGUF: rebuilt from its metadata); None with
    skip_tokenizer_init. A folder without tokenizer files is a ValueError naming them."""
    if model_config.skip_tokenizer_init:
        return None
    if model_config.is_gguf:
        from pagedllm.loader.gguf_loader import load_gguf_tokenizer

        return load_gguf_tokenizer(model_config.path)
    from pagedllm.loader.tokenizer import TOKENIZER_FILES, load_tokenizer_folder

    try:
        return load_tokenizer_folder(model_config.path)
    except (OSError, ValueError):
        if any(os.path.isfile(os.path.join(model_config.path, name)) for name in TOKENIZER_FILES):
            raise
    # transformers' own error for a folder without a tokenizer speaks of slow tokenizer classes.
    raise ValueError(f"{model_config.path} has no tokenizer: none of {', '.join(TOKENIZER_FILES)} is there. "
                     "To run prompts given as token ids without one, pass skip_tokenizer_init=True "
                     "(--skip-tokenizer-init)")


def _no_tokenizer(what: str, advice: str = "") -> ValueError:
    return ValueError(f"{what} needs a tokenizer, and this engine loads none (skip_tokenizer_init=True, "
                      f"--skip-tokenizer-init){advice}")


def eos_token_ids(model_config: ModelConfig, tokenizer) -> tuple[int, ...]:
    """EOS ids from generation_config.json, config.json and the tokenizer (union)."""
    ids: list[int] = []
    sources = [getattr(model_config.hf_config, "eos_token_id", None)]
    generation_config = os.path.join(model_config.path, "generation_config.json")
    if not model_config.is_gguf and os.path.isfile(generation_config):
        with open(generation_config) as f:
            sources.insert(0, json.load(f).get("eos_token_id"))
    sources.append(getattr(tokenizer, "eos_token_id", None))
    for source in sources:
        for token_id in source if isinstance(source, list) else [source]:
            if isinstance(token_id, int) and token_id not in ids:
                ids.append(token_id)
    return tuple(ids)


class InputProcessor:
    def __init__(self, model_config: ModelConfig, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = model_config.max_model_len
        self.vocab_size = model_config.hf_config.vocab_size
        self.eos_token_ids = eos_token_ids(model_config, tokenizer)
        self.grammar_compiler = GrammarCompiler(tokenizer, self.vocab_size, self.eos_token_ids)
        # The model's recommended sampling defaults (generation_config.json), only the keys
        # it sets; a request's own fields override them.
        self.default_sampling: dict[str, Any] = dict(model_config.default_sampling)

    def tokenize(self, prompt: PromptInput | list[int]) -> tuple[str | None, list[int]]:
        """-> (prompt text or None, token ids). A list is the prompt's token ids."""
        if isinstance(prompt, str):
            return prompt, self._encode(prompt)
        if isinstance(prompt, list):
            prompt = {"prompt_token_ids": prompt}
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            token_ids = prompt["prompt_token_ids"]
            if not isinstance(token_ids, (list, tuple)) or not all(
                    isinstance(t, int) and not isinstance(t, bool) for t in token_ids):
                raise ValueError("prompt_token_ids must be a list of integers")
            return prompt.get("prompt"), list(token_ids)
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            return prompt["prompt"], self._encode(prompt["prompt"])
        raise ValueError("a prompt must be a string, a list of token ids, or a dict with 'prompt' or "
                         f"'prompt_token_ids', got {type(prompt).__name__}")

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise _no_tokenizer("a text prompt", ": give the prompt as token ids ({'prompt_token_ids': [...]} "
                                "or a list of ints)")
        return self.tokenizer(text).input_ids

    @staticmethod
    def cache_salt(prompt: PromptInput) -> str | None:
        """The prompt dict's "cache_salt" (validated); None for text prompts."""
        return validate_cache_salt(prompt.get("cache_salt")) if isinstance(prompt, dict) else None

    def apply_chat_template(self, messages: list[dict], chat_template: str | None = None,
                            add_generation_prompt: bool = True, **template_kwargs) -> str:
        if self.tokenizer is None:
            raise _no_tokenizer("chat")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ValueError("each message must be a dict with a string 'role'")
        if chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; pass one (--chat-template)")
        return self.tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **template_kwargs)

    def tokenize_chat(self, text: str) -> list[int]:
        # The template already wrote the special tokens (BOS, role markers).
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> tuple[list[int], SamplingParams]:
        """Check the prompt against the model's limits -> (the prompt's token ids, cut to
        the last truncate_prompt_tokens of them; the params with the engine's fields filled
        in: the model's EOS ids and the token ids of bad_words)."""
        prompt_token_ids = self._truncate(prompt_token_ids, params.truncate_prompt_tokens)
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise ValueError("the prompt is empty: at least one token is needed")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of range: the vocabulary has "
                             f"{self.vocab_size} tokens (ids 0..{self.vocab_size - 1})")
        if num_prompt >= self.max_model_len:
            raise ValueError(f"This model's maximum context length is {self.max_model_len} tokens. However, "
                             f"your prompt has {num_prompt} tokens, leaving no room for the completion.")
        max_tokens = params.max_tokens
        if max_tokens is not None and num_prompt + max_tokens > self.max_model_len:
            raise ValueError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                             f"requested {num_prompt + max_tokens} tokens ({num_prompt} in the prompt, "
                             f"{max_tokens} for the completion). Please reduce the length of the prompt "
                             f"or max_tokens.")
        self._check_token_ids(params)
        if self.tokenizer is None:
            # Each of these reads the text the tokens spell.
            for name, value in (("stop", params.stop), ("bad_words", params.bad_words),
                                ("structured_outputs", params.structured_outputs)):
                if value:
                    raise _no_tokenizer(name)
        if params.structured_outputs is not None:
            self.grammar_compiler.compile(params.structured_outputs)  # a cache hit once compiled
        # A top_k past the vocabulary keeps every token, as top_k=0 does (and fits an int64 tensor).
        return prompt_token_ids, dataclasses.replace(params, eos_token_ids=self.eos_token_ids,
                                                     top_k=min(params.top_k, self.vocab_size),
                                                     bad_words_token_ids=self._bad_words_token_ids(params.bad_words))

    def _truncate(self, prompt_token_ids: list[int], truncate_prompt_tokens: int | None) -> list[int]:
        """The last truncate_prompt_tokens prompt tokens; -1 means max_model_len (vLLM)."""
        if truncate_prompt_tokens is None:
            return prompt_token_ids
        if truncate_prompt_tokens > self.max_model_len:
            raise ValueError(f"truncate_prompt_tokens ({truncate_prompt_tokens}) is greater than max_model_len "
                             f"({self.max_model_len}); select a smaller truncation size")
        num_kept = self.max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens
        return prompt_token_ids[-num_kept:]

    def _check_token_ids(self, params: SamplingParams) -> None:
        """Every token id a request names must exist in the vocabulary (the sampler indexes
        the logits with them)."""
        fields = [("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or {}),
                  ("allowed_token_ids", params.allowed_token_ids or [])]
        for name, token_ids in fields:
            bad = [t for t in token_ids if t >= self.vocab_size]
            if bad:
                raise ValueError(f"{name} must be token ids below the vocabulary size {self.vocab_size}, "
                                 f"got {bad[0]}")

    def _bad_words_token_ids(self, bad_words: list[str] | None) -> tuple[tuple[int, ...], ...]:
        """Each bad word's token ids as vLLM bans it: the word (leading spaces stripped) and
        the word after a space, which many tokenizers encode differently (the middle of a
        text); duplicates and empty encodings dropped."""
        sequences: list[tuple[int, ...]] = []
        for word in bad_words or []:
            for text in (word.lstrip(), " " + word.lstrip()):
                token_ids = tuple(self.tokenizer(text, add_special_tokens=False).input_ids)
                if token_ids and token_ids not in sequences:
                    sequences.append(token_ids)
        bad = [t for token_ids in sequences for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"bad_words must encode to token ids below the vocabulary size {self.vocab_size}, "
                             f"got {bad[0]}")
        return tuple(sequences)
