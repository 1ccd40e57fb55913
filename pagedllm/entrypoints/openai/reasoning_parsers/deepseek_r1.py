"""DeepSeek-R1 (and its distills): the chat template opens <think> in the prompt, so the
output starts as thinking, with or without a repeated <think>, until </think>."""

from __future__ import annotations

from pagedllm.entrypoints.openai.reasoning_parsers.base import ReasoningParser


class DeepSeekR1ReasoningParser(ReasoningParser):
    implicit_start = True
