"""Hermes-style tool calls (Hermes 2 Pro, Qwen2.5, Qwen3): each call is a JSON object
`{"name": ..., "arguments": {...}}` between <tool_call> and </tool_call>, with prose
before, between or after the calls.

A tag whose JSON is not a call stays in the content as written, up to its </tool_call>.
While streaming, that is known only until the call's name has been sent: a call that
breaks after that (a truncated output, say) keeps what was sent, and the rest of its
tag is dropped.
"""

from __future__ import annotations

from pagedllm.entrypoints.openai.tool_parsers.base import ContentText, ExtractedToolCalls, ToolParser, partial_tag_len
from pagedllm.entrypoints.openai.tool_parsers.call_stream import CallStream, MalformedCall, call_from_value
from pagedllm.entrypoints.openai.tool_parsers.json_stream import IncrementalJson, loads_prefix, skip_ws

START, END = "<tool_call>", "</tool_call>"
ARG_KEYS = ("arguments",)

# Where the stream is: in prose, in a call's JSON, between a call's JSON and its </tool_call>,
# in a tag sent back as content, in the rest of a tag whose call broke after it started.
_CONTENT, _CALL, _AFTER_CALL, _REJECTED, _DROPPED = range(5)


class HermesToolParser(ToolParser):

    def __init__(self) -> None:
        super().__init__()
        self._state = _CONTENT
        self._held = ""  # text that may be the start of a tag
        self._doc: IncrementalJson | None = None
        self._raw = ""  # the current tag as written, content if its call is malformed

    def extract_tool_calls(self, model_output: str) -> ExtractedToolCalls:
        text, content, calls, pos = model_output, ContentText(), [], 0
        while (start := text.find(START, pos)) >= 0:
            content.add(text[pos:start])
            try:
                value, end = loads_prefix(text, skip_ws(text, start + len(START)))
                calls.append(call_from_value(value, ARG_KEYS))
            except ValueError:
                close = text.find(END, start + len(START))
                pos = len(text) if close < 0 else close + len(END)
                content.add(text[start:pos])
                continue
            content.call()
            after = skip_ws(text, end)
            pos = after + len(END) if text.startswith(END, after) else end
        content.add(text[pos:])
        content.close()
        return ExtractedToolCalls(calls, content.take() or None)

    def _feed(self, text: str) -> None:
        while text:
            if self._state == _CONTENT:
                text = self._in_content(text)
            elif self._state == _CALL:
                text = self._in_call(text)
            elif self._state == _AFTER_CALL:
                text = self._after_call(text)
            else:
                text = self._in_skipped_tag(text)

    def _finish(self) -> None:
        if self._state == _CALL and not self._calls[-1].started:
            self._calls.pop()
            self._content.add(self._raw)
        elif self._state in (_CONTENT, _AFTER_CALL, _REJECTED):
            self._content.add(self._held)

    def _in_content(self, text: str) -> str:
        text, self._held = self._held + text, ""
        start = text.find(START)
        if start < 0:
            keep = len(text) - partial_tag_len(text, START)
            self._content.add(text[:keep])
            self._held = text[keep:]
            return ""
        self._content.add(text[:start])
        self._doc = IncrementalJson(span_depth=1)
        self._calls.append(CallStream(len(self._calls), (), ARG_KEYS))
        self._raw = START
        self._state = _CALL
        return text[start + len(START):]

    def _in_call(self, text: str) -> str:
        call = self._calls[-1]
        used = self._doc.feed(text)
        self._raw += text[:used]
        try:
            self._advance(call, self._doc)
            if self._doc.failed:
                raise MalformedCall("malformed JSON in <tool_call>")
        except MalformedCall:
            if call.started:
                self._state = _DROPPED
                return text[used:]
            self._calls.pop()
            self._state = _REJECTED
            return self._raw + text[used:]
        if self._doc.done:
            self._state = _AFTER_CALL
        return text[used:]

    def _after_call(self, text: str) -> str:
        """Whitespace and </tool_call> after a call's JSON are not content; anything else is."""
        text, self._held = self._held + text, ""
        rest = text[skip_ws(text, 0):]
        if rest.startswith(END):
            self._state = _CONTENT
            return rest[len(END):]
        if END.startswith(rest):
            self._held = text
            return ""
        self._state = _CONTENT
        return text

    def _in_skipped_tag(self, text: str) -> str:
        """The rest of a rejected or dropped tag, up to and with its </tool_call>."""
        text, self._held = self._held + text, ""
        close = text.find(END)
        if close < 0:
            keep = len(text) - partial_tag_len(text, END)
            skipped, self._held, rest = text[:keep], text[keep:], ""
        else:
            skipped, rest = text[:close + len(END)], text[close + len(END):]
        if self._state == _REJECTED:
            self._content.add(skipped)
        if close >= 0:
            self._state = _CONTENT
        return rest
