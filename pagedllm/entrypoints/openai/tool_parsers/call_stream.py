"""One tool call written as a JSON object `{"name": ..., <arguments key>: {...}}`: read
whole (`call_from_value`) or streamed from an IncrementalJson (`CallStream`).

Both apply the same rules, so a stream that completes gives the same call: the name is
a non-empty string; the arguments are an object under the first of the format's
argument keys present ({} if none); other keys are ignored.
"""

from __future__ import annotations

import json
from typing import Any

from pagedllm.entrypoints.openai.protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall
from pagedllm.entrypoints.openai.tool_parsers.json_stream import IncrementalJson, Span, dumps


class MalformedCall(ValueError):
    pass


def call_from_value(value: Any, arg_keys: tuple[str, ...]) -> ToolCall:
    """The call a parsed JSON value stands for; MalformedCall if it is none."""
    if not isinstance(value, dict):
        raise MalformedCall("a tool call is a JSON object")
    name = value.get("name")
    if not isinstance(name, str) or not name:
        raise MalformedCall("a tool call needs a name")
    arguments = next((value[key] for key in value if key in arg_keys), {})
    if not isinstance(arguments, dict):
        raise MalformedCall("a tool call's arguments are a JSON object")
    return ToolCall(function=FunctionCall(name=name, arguments=dumps(arguments)))


class CallStream:
    """The call object at `prefix` in a streamed document, sent as it becomes known:
    first a piece with id, type and name (once the name is complete and the arguments
    have begun, so that a call is not announced before it looks like one), then the
    arguments' text as far as it is final.

    `advance` raises MalformedCall when the object cannot be a call; before `started`
    the parser can still hand the text back as content, after it the pieces are out.
    """

    def __init__(self, index: int, prefix: tuple[str | int, ...], arg_keys: tuple[str, ...]) -> None:
        self.index = index
        self.prefix = prefix
        self.call: ToolCall | None = None  # once started, with the arguments sent so far
        self.done = False
        self._arg_keys = arg_keys
        self._arguments: Span | None = None
        self._sent = 0  # where the arguments' unsent text begins in the document's text

    @property
    def started(self) -> bool:
        return self.call is not None

    def advance(self, doc: IncrementalJson) -> list[DeltaToolCall]:
        """The pieces the document's new text makes ready."""
        whole = doc.spans.get(self.prefix)
        if self.done or whole is None:
            return []
        if _first_char(doc, whole) not in ("{", ""):
            raise MalformedCall("a tool call is a JSON object")
        if self._arguments is None:
            present = [doc.spans[path] for path in (self.prefix + (key,) for key in self._arg_keys)
                       if path in doc.spans]
            if present:
                self._arguments = min(present, key=lambda span: span.start)
                self._sent = self._arguments.start
        pieces = [] if self.call is not None else self._header(doc, whole)
        if self.call is None:
            return pieces
        if self._arguments is not None:
            end = len(doc.text) if self._arguments.end is None else self._arguments.end
            new, self._sent = doc.text[self._sent:end], end
        else:
            new = "{}" if whole.end is not None else ""
        if new:
            self.call.function.arguments += new
            pieces.append(DeltaToolCall(index=self.index, function=DeltaFunctionCall(arguments=new)))
        self.done = whole.end is not None
        return pieces

    def _header(self, doc: IncrementalJson, whole: Span) -> list[DeltaToolCall]:
        name = None
        name_span = doc.spans.get(self.prefix + ("name",))
        if name_span is not None and name_span.end is not None:
            text = doc.text[name_span.start:name_span.end]
            if not text.startswith('"') or text == '""':
                raise MalformedCall("a tool call needs a name")
            name = json.loads(text)
        first = "" if self._arguments is None else _first_char(doc, self._arguments)
        if first not in ("{", ""):
            raise MalformedCall("a tool call's arguments are a JSON object")
        if name is None and whole.end is not None:
            raise MalformedCall("a tool call needs a name")
        if name is None or not (first or whole.end is not None):
            return []
        self.call = ToolCall(function=FunctionCall(name=name, arguments=""))
        return [DeltaToolCall(index=self.index, id=self.call.id, type="function",
                              function=DeltaFunctionCall(name=name))]


def _first_char(doc: IncrementalJson, span: Span) -> str:
    """The value's first character, "" while none is written (a number shows when complete)."""
    return doc.text[span.start:span.start + 1]
