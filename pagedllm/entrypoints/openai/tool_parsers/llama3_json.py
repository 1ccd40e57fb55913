"""Llama 3.x JSON tool calls: the whole output is the calls, optionally after
<|python_tag|>: JSON objects `{"name": ..., "parameters": {...}}` ("arguments" also
read) separated by "; ". An output that does not start with `{` is plain content.

Text after the last call that is not another call is content; so is everything from a
call that is not one (the whole output if it is the first). While streaming, that is
known only until the call's name has been sent: a call that breaks after that keeps what
was sent, and the rest of the output is dropped.
"""

from __future__ import annotations

from pagedllm.entrypoints.openai.tool_parsers.base import ContentText, ExtractedToolCalls, ToolParser
from pagedllm.entrypoints.openai.tool_parsers.call_stream import CallStream, MalformedCall, call_from_value
from pagedllm.entrypoints.openai.tool_parsers.json_stream import IncrementalJson, loads_prefix, skip_ws

PYTHON_TAG = "<|python_tag|>"
ARG_KEYS = ("parameters", "arguments")
SEPARATOR = ";"

# Where the stream is: before the first `{` (or the first other character), in a call's
# JSON, between calls, in plain content, in the rest of an output whose call broke.
_START, _CALL, _BETWEEN, _CONTENT, _DROPPED = range(5)


class Llama3JsonToolParser(ToolParser):

    def __init__(self) -> None:
        super().__init__()
        self._state = _START
        self._held = ""  # the output's start, until its first character decides
        self._doc: IncrementalJson | None = None
        self._raw = ""  # the output's text from where content would start if this call is malformed
        self._separated = False  # whether the ";" between two calls has come

    def extract_tool_calls(self, model_output: str) -> ExtractedToolCalls:
        text, calls, rest = model_output, [], 0
        pos = skip_ws(text, 0)
        if text.startswith(PYTHON_TAG, pos):
            pos = skip_ws(text, pos + len(PYTHON_TAG))
        while text.startswith("{", pos):
            try:
                value, end = loads_prefix(text, pos)
                calls.append(call_from_value(value, ARG_KEYS))
            except ValueError:
                break
            pos = skip_ws(text, end)
            if text.startswith(SEPARATOR, pos):
                pos = skip_ws(text, pos + len(SEPARATOR))
            rest = pos
        content = ContentText()
        if calls:
            content.call()
        content.add(text[rest:])
        content.close()
        return ExtractedToolCalls(calls, content.take() or None)

    def _feed(self, text: str) -> None:
        while text:
            if self._state == _START:
                text = self._at_start(text)
            elif self._state == _CALL:
                text = self._in_call(text)
            elif self._state == _BETWEEN:
                text = self._between(text)
            else:
                if self._state == _CONTENT:
                    self._content.add(text)
                text = ""

    def _finish(self) -> None:
        if self._state == _START:
            self._content.add(self._held)
        elif self._state == _CALL and not self._calls[-1].started:
            self._calls.pop()
            self._content.add(self._raw)

    def _at_start(self, text: str) -> str:
        text, self._held = self._held + text, ""
        pos = skip_ws(text, 0)
        if text.startswith(PYTHON_TAG, pos):
            pos = skip_ws(text, pos + len(PYTHON_TAG))
        elif PYTHON_TAG.startswith(text[pos:]):  # all whitespace, or a tag in the making
            self._held = text
            return ""
        if pos == len(text):
            self._held = text
            return ""
        if text[pos] != "{":
            self._state = _CONTENT
            return text
        self._begin_call(text[:pos])
        return text[pos:]

    def _begin_call(self, raw: str) -> None:
        self._doc = IncrementalJson(span_depth=1)
        self._calls.append(CallStream(len(self._calls), (), ARG_KEYS))
        self._raw = raw
        self._state = _CALL

    def _in_call(self, text: str) -> str:
        call = self._calls[-1]
        used = self._doc.feed(text)
        self._raw += text[:used]
        try:
            self._advance(call, self._doc)
            if self._doc.failed:
                raise MalformedCall("malformed JSON tool call")
        except MalformedCall:
            if call.started:
                self._state = _DROPPED
                return ""
            self._calls.pop()
            self._state = _CONTENT
            return self._raw + text[used:]
        if self._doc.done:
            self._state = _BETWEEN
            self._separated = False
        return text[used:]

    def _between(self, text: str) -> str:
        """Whitespace and one ";" between calls are not content; anything else is."""
        pos = skip_ws(text, 0)
        if not self._separated and text.startswith(SEPARATOR, pos):
            self._separated = True
            pos = skip_ws(text, pos + len(SEPARATOR))
        if pos == len(text):
            return ""
        if text[pos] == "{":
            self._begin_call("")
        else:
            self._state = _CONTENT
        return text[pos:]
