"""What a tool parser is: the model's text in, tool calls and the remaining content out,
whole (`extract_tool_calls`) or streamed delta by delta, one instance per choice.

Content is the text outside the calls, except the whitespace next to a call, which only
separates it from the prose, and content that is whitespace only. Both paths build it
with the same `ContentText`, so the streamed content adds up to the non-streaming one.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.entrypoints.openai.protocol import DeltaMessage, DeltaToolCall, ToolCall
from pagedllm.entrypoints.openai.tool_parsers.call_stream import CallStream
from pagedllm.entrypoints.openai.tool_parsers.json_stream import IncrementalJson


@dataclass
class ExtractedToolCalls:
    tool_calls: list[ToolCall]
    content: str | None  # the text outside the calls; None if there is none but whitespace


def partial_tag_len(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag`: they must
    wait for the next delta before they can be sent as text."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class ContentText:
    """Content as it may be sent: whitespace is held back until text follows it, dropped
    where a call follows it (`call`) and after a call; what is left at `close` goes out
    if any content did."""

    def __init__(self) -> None:
        self._out: list[str] = []
        self._pending = ""
        self._after_call = False
        self._sent_any = False

    def add(self, text: str) -> None:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        body = text.rstrip()
        if not body:
            self._pending += text
            return
        self._out.append(self._pending + body)
        self._pending = text[len(body):]
        self._sent_any = True

    def call(self) -> None:
        self._pending = ""
        self._after_call = True

    def close(self) -> None:
        if self._sent_any:
            self._out.append(self._pending)
        self._pending = ""

    def take(self) -> str:
        text = "".join(self._out)
        self._out.clear()
        return text


class ToolParser:
    """Subclasses implement `extract_tool_calls` and the streaming hooks `_feed` / `_finish`,
    which pass content to `self._content` and stream calls with `_advance`."""

    def __init__(self) -> None:
        self._content = ContentText()
        self._calls: list[CallStream] = []
        self._pieces: list[DeltaToolCall] = []

    @property
    def tools_called(self) -> bool:
        """Whether the stream has sent a tool call (finish_reason "tool_calls")."""
        return any(call.started for call in self._calls)

    def extract_tool_calls(self, model_output: str) -> ExtractedToolCalls:
        raise NotImplementedError

    def extract_tool_calls_streaming(self, delta_text: str) -> DeltaMessage | None:
        """The content and tool-call pieces to send after this delta; None if nothing yet."""
        self._feed(delta_text)
        return self._take()

    def finish_streaming(self) -> DeltaMessage | None:
        """Whatever was held back, once the output is complete."""
        self._finish()
        self._content.close()
        return self._take()

    def _feed(self, text: str) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _advance(self, call: CallStream, doc: IncrementalJson) -> None:
        """Streams the call's new pieces (MalformedCall: see CallStream.advance)."""
        was_started = call.started
        self._pieces += call.advance(doc)
        if call.started and not was_started:
            self._content.call()

    def _take(self) -> DeltaMessage | None:
        content = self._content.take()
        pieces, self._pieces = self._pieces, []
        if not content and not pieces:
            return None
        return DeltaMessage(content=content or None, tool_calls=pieces or None)
