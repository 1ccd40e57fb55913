"""Tool-call parsers by name: each reads one model family's way of writing tool calls
into OpenAI tool calls, whole or streamed."""

from __future__ import annotations

from pagedllm.entrypoints.openai.tool_parsers.base import ExtractedToolCalls, ToolParser
from pagedllm.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from pagedllm.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser
from pagedllm.entrypoints.openai.tool_parsers.required import RequiredToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "required": RequiredToolParser,
}


def get_tool_parser(name: str) -> type[ToolParser]:
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool parser {name!r}; choose one of: {', '.join(TOOL_PARSERS)}") from None


__all__ = ["ExtractedToolCalls", "TOOL_PARSERS", "ToolParser", "get_tool_parser"]
