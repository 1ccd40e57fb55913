"""Tool calling and reasoning on the chat API: what a request's `tools` / `tool_choice`
ask of the model, and how each choice's generated text becomes reasoning, content and
tool calls (whole, or delta by delta while streaming).

- tool_choice "none" (or no tools): the text is content.
- "auto": the model decides; the server's tool-call parser (--tool-call-parser) finds
  the calls in the model's own format (Hermes <tool_call> tags, Llama 3 JSON, ...).
- "required": a grammar forces a JSON array of calls, [{"name", "parameters"}, ...]
  (vLLM's convention), built from the tools' parameter schemas: even a small model
  produces valid calls.
- a named function: a grammar forces that function's arguments JSON.
The reasoning parser (--reasoning-parser) first splits off the <think> block.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from pagedllm.entrypoints.openai.protocol import (ChatCompletionRequest, DeltaFunctionCall, DeltaMessage,
                                                  DeltaToolCall, FunctionCall, NamedToolChoice, ToolCall,
                                                  tool_call_id)
from pagedllm.entrypoints.openai.reasoning_parsers import get_reasoning_parser
from pagedllm.entrypoints.openai.tool_parsers import get_tool_parser
from pagedllm.sampling_params import StructuredOutputsParams


class ToolMode(enum.Enum):
    NONE = "none"
    AUTO = "auto"
    REQUIRED = "required"
    NAMED = "named"


@dataclass(frozen=True)
class ToolUse:
    """What one request asks: the mode, the forced function (NAMED), the grammar that
    enforces REQUIRED / NAMED, and the tools to render through the chat template."""

    mode: ToolMode
    function_name: str | None = None
    constraint: StructuredOutputsParams | None = None
    template_tools: list[dict] | None = None

    @classmethod
    def of(cls, request: ChatCompletionRequest, tool_parser: str | None) -> ToolUse:
        """Raises ValueError naming the field when tools and tool_choice disagree."""
        tools, choice = request.tools, request.tool_choice
        if not tools:
            if choice not in (None, "none"):
                raise ValueError("tool_choice needs tools: the request gives none")
            return cls(ToolMode.NONE)
        template_tools = [tool.model_dump(exclude_none=True) for tool in tools]
        if choice == "none":
            return cls(ToolMode.NONE, template_tools=template_tools)
        if isinstance(choice, NamedToolChoice):
            tool = next((t for t in tools if t.function.name == choice.function.name), None)
            if tool is None:
                raise ValueError(f"tool_choice names the function {choice.function.name!r}, which is not in tools")
            return cls(ToolMode.NAMED, tool.function.name, StructuredOutputsParams(json=_parameters(tool)),
                       template_tools)
        if choice == "required":
            return cls(ToolMode.REQUIRED, None,
                       StructuredOutputsParams(json=_calls_schema(tools, request.parallel_tool_calls)),
                       template_tools)
        if tool_parser is None:
            raise ValueError('tool_choice "auto" (the default when tools are given) needs the server started '
                             'with --tool-call-parser; "required", a named function or "none" work without it')
        return cls(ToolMode.AUTO, template_tools=template_tools)


def _parameters(tool) -> dict:
    return tool.function.parameters or {"type": "object", "properties": {}}


def _calls_schema(tools, parallel_tool_calls: bool) -> dict:
    """A JSON array of one or more calls, each naming one tool with its arguments."""
    calls = [{"type": "object", "properties": {"name": {"const": tool.function.name},
                                               "parameters": _parameters(tool)},
              "required": ["name", "parameters"], "additionalProperties": False} for tool in tools]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    return schema


@dataclass
class ParsedChoice:
    reasoning_content: str | None
    content: str | None
    tool_calls: list[ToolCall]


class ChoiceParser:
    """One choice's text -> reasoning, content and tool calls; for a stream, one
    instance per choice fed each text delta in order."""

    def __init__(self, tool_use: ToolUse, tool_parser: str | None, reasoning_parser: str | None,
                 include_reasoning: bool) -> None:
        self.tool_use = tool_use
        self.include_reasoning = include_reasoning
        self._reasoning = get_reasoning_parser(reasoning_parser)() if reasoning_parser else None
        mode = tool_use.mode
        self._tools = None
        if mode == ToolMode.AUTO:
            self._tools = get_tool_parser(tool_parser)()
        elif mode == ToolMode.REQUIRED:
            self._tools = get_tool_parser("required")()
        self._named_call_id: str | None = None  # NAMED: the id of the call, once its first piece is sent

    @property
    def tools_called(self) -> bool:
        """Whether a stream has sent a tool call so far."""
        if self.tool_use.mode == ToolMode.NAMED:
            return self._named_call_id is not None
        return self._tools is not None and self._tools.tools_called

    # ---- a whole output ---------------------------------------------------------------

    def parse(self, text: str) -> ParsedChoice:
        reasoning, content = self._reasoning.extract_reasoning(text) if self._reasoning else (None, text)
        tool_calls: list[ToolCall] = []
        if self.tool_use.mode == ToolMode.NAMED:
            tool_calls = [ToolCall(function=FunctionCall(name=self.tool_use.function_name, arguments=content or ""))]
            content = None
        elif self._tools is not None and content:
            extracted = self._tools.extract_tool_calls(content)
            tool_calls, content = extracted.tool_calls, extracted.content
        return ParsedChoice(reasoning if self.include_reasoning else None, content, tool_calls)

    # ---- a stream ------------------------------------------------------------------------

    def stream(self, delta_text: str) -> DeltaMessage | None:
        if self._reasoning is None:
            return self._content_delta(delta_text)
        return self._merge(self._reasoning.extract_reasoning_streaming(delta_text))

    def finish(self) -> DeltaMessage | None:
        """Whatever the parsers still hold once the choice has finished."""
        pieces = []
        if self._reasoning is not None:
            pieces.append(self._merge(self._reasoning.finish_streaming()))
        if self._tools is not None:
            pieces.append(join_deltas([self._tools.finish_streaming()]))
        return join_deltas(pieces)

    def _merge(self, reasoning_delta: DeltaMessage | None) -> DeltaMessage | None:
        """The reasoning parser's delta, its content passed on through the tool parser."""
        if reasoning_delta is None:
            return None
        parts = []
        if reasoning_delta.reasoning_content and self.include_reasoning:
            parts.append(DeltaMessage(reasoning_content=reasoning_delta.reasoning_content))
        if reasoning_delta.content:
            parts.append(self._content_delta(reasoning_delta.content))
        return join_deltas(parts)

    def _content_delta(self, text: str) -> DeltaMessage | None:
        if not text:
            return None
        if self.tool_use.mode == ToolMode.NAMED:
            return DeltaMessage(tool_calls=[self._named_piece(text)])
        if self._tools is not None:
            return join_deltas([self._tools.extract_tool_calls_streaming(text)])
        return DeltaMessage(content=text)

    def _named_piece(self, arguments: str) -> DeltaToolCall:
        if self._named_call_id is None:
            self._named_call_id = tool_call_id()
            return DeltaToolCall(index=0, id=self._named_call_id, type="function",
                                 function=DeltaFunctionCall(name=self.tool_use.function_name, arguments=arguments))
        return DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=arguments))


def join_deltas(deltas: list[DeltaMessage | None]) -> DeltaMessage | None:
    """One delta carrying the reasoning, content and tool-call pieces of several, in order."""
    deltas = [delta for delta in deltas if delta is not None]
    if not deltas:
        return None
    reasoning = "".join(d.reasoning_content or "" for d in deltas) or None
    content = "".join(d.content or "" for d in deltas) or None
    tool_calls = _merge_pieces([call for d in deltas for call in (d.tool_calls or [])]) or None
    return DeltaMessage(reasoning_content=reasoning, content=content, tool_calls=tool_calls)


def _merge_pieces(pieces: list[DeltaToolCall]) -> list[DeltaToolCall]:
    """Consecutive pieces of the same call as one (its id and name, then the arguments
    text joined), so that a chunk carries each call once."""
    merged: list[DeltaToolCall] = []
    for piece in pieces:
        last = merged[-1] if merged else None
        if last is None or last.index != piece.index or piece.id is not None:
            merged.append(piece.model_copy(deep=True))
            continue
        arguments = (piece.function.arguments or "") if piece.function else ""
        if last.function is None:
            last.function = DeltaFunctionCall()
        last.function.arguments = (last.function.arguments or "") + arguments
    return merged


def template_messages(messages: list[dict]) -> list[dict]:
    """Assistant tool calls as chat templates expect them: OpenAI sends the arguments as
    JSON text, templates render them as objects (`tool_call.arguments | tojson`)."""
    for message in messages:
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except json.JSONDecodeError:
                    pass  # not JSON: the template gets the text as the client sent it
    return messages
