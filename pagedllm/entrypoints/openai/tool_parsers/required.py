"""The tool calls pagedllm forces with a grammar for `tool_choice: "required"` (vLLM's
convention): the whole output is a JSON array `[{"name": ..., "parameters": {...}}, ...]`.
While streaming, each call goes out as soon as its element shows, its arguments as they
arrive.

The grammar leaves room only for an output cut short (max_tokens): the complete calls
before the cut are the result. An output that is not such an array at all is content.
While streaming, a call cut short after its name was sent keeps what was sent.
"""

from __future__ import annotations

from pagedllm.entrypoints.openai.tool_parsers.base import ContentText, ExtractedToolCalls, ToolParser
from pagedllm.entrypoints.openai.tool_parsers.call_stream import CallStream, MalformedCall, call_from_value
from pagedllm.entrypoints.openai.tool_parsers.json_stream import IncrementalJson, loads_prefix, skip_ws

ARG_KEYS = ("parameters",)

# Where the stream is: in the array, in an output that is not one, past the array's end or break.
_ARRAY, _CONTENT, _DONE = range(3)


class RequiredToolParser(ToolParser):

    def __init__(self) -> None:
        super().__init__()
        self._state = _ARRAY
        self._doc = IncrementalJson(span_depth=2)  # (i,) is a call, (i, "name") its name
        self._raw = ""  # the output as written, content until a call starts

    def extract_tool_calls(self, model_output: str) -> ExtractedToolCalls:
        text, calls = model_output, []
        pos = skip_ws(text, 0)
        if text.startswith("[", pos):
            pos = skip_ws(text, pos + 1)
            if text.startswith("]", pos):
                return ExtractedToolCalls([], None)
            while True:
                try:
                    value, end = loads_prefix(text, pos)
                    calls.append(call_from_value(value, ARG_KEYS))
                except ValueError:
                    break
                pos = skip_ws(text, end)
                if not text.startswith(",", pos):
                    break
                pos = skip_ws(text, pos + 1)
        if calls:
            return ExtractedToolCalls(calls, None)
        content = ContentText()
        content.add(text)
        content.close()
        return ExtractedToolCalls([], content.take() or None)

    def _feed(self, text: str) -> None:
        if self._state == _CONTENT:
            self._content.add(text)
        if self._state != _ARRAY:
            return
        used = self._doc.feed(text)
        if not self.tools_called:
            self._raw += text[:used]
        try:
            self._advance_calls()
        except MalformedCall:
            if self.tools_called:
                self._state = _DONE
            else:
                self._state = _CONTENT
                self._content.add(self._raw + text[used:])
            return
        if self._doc.done:
            self._state = _DONE

    def _finish(self) -> None:
        if self._state == _ARRAY and not self.tools_called:
            self._content.add(self._raw)

    def _advance_calls(self) -> None:
        doc = self._doc
        if doc.text[:1] not in ("[", ""):
            raise MalformedCall("the output is not a JSON array")
        while (len(self._calls),) in doc.spans:
            self._calls.append(CallStream(len(self._calls), (len(self._calls),), ARG_KEYS))
        for call in self._calls:
            self._advance(call, doc)
        if doc.failed:
            raise MalformedCall("malformed JSON in the array of tool calls")
