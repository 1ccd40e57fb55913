"""Qwen3 (hybrid thinking): a thinking output opens with <think>; with thinking switched
off (`enable_thinking: false`, or /no_think) the output has no </think> and is all answer."""

from __future__ import annotations

from pagedllm.entrypoints.openai.reasoning_parsers.base import ReasoningParser


class Qwen3ReasoningParser(ReasoningParser):
    implicit_start = False
