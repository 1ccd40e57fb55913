"""What a reasoning parser is: it splits a model's thinking, written inside
<think>…</think>, from its answer, whole (`extract_reasoning`) or streamed delta by delta
(one instance per choice), for `reasoning_content` and `content`.

The newlines a model puts after </think> are not part of the answer; a part that is
whitespace only is none (None). Streamed text is held back only while it may be the start
of a tag or is whitespace that may turn out to be all there is.
"""

from __future__ import annotations

from pagedllm.entrypoints.openai.protocol import DeltaMessage
from pagedllm.entrypoints.openai.tool_parsers.base import ContentText, partial_tag_len

START, END = "<think>", "</think>"

# Where the stream is: before its first text decides whether it opens with <think>, in the
# thinking, in the answer after </think>, in an output that has no thinking.
_PREFIX, _REASONING, _ANSWER, _CONTENT_ONLY = range(4)


def _sendable(text: str) -> str | None:
    return text if text.strip() else None


class ReasoningParser:
    """Subclasses say whether the chat template opened the think block in the prompt
    (`implicit_start`): then the output starts as thinking even without <think>, and
    thinking that never ends is still thinking. Otherwise only an output that opens with
    <think> thinks, and one whose </think> never comes is all content (thinking was off).
    A streamed output that opened with <think> has sent its thinking as such before it is
    known whether </think> comes."""

    implicit_start: bool

    def __init__(self) -> None:
        self._state = _PREFIX
        self._held = ""  # text that may be (the start of) a tag
        self._reasoning = ContentText()
        self._answer = ContentText()
        self._answer_begun = False  # whether the newlines after </think> are past

    def extract_reasoning(self, model_output: str) -> tuple[str | None, str | None]:
        """(reasoning_content, content)."""
        opened = model_output.lstrip()
        if opened.startswith(START):
            body = opened[len(START):]
        elif self.implicit_start:
            body = model_output
        else:
            return None, _sendable(model_output)
        reasoning, closed, answer = body.partition(END)
        if not closed and not self.implicit_start:
            return None, _sendable(model_output)
        return _sendable(reasoning), _sendable(answer.lstrip("\n"))

    def extract_reasoning_streaming(self, delta_text: str) -> DeltaMessage | None:
        """The reasoning and content to send after this delta; None if nothing yet."""
        text = delta_text
        while text:
            if self._state == _PREFIX:
                text = self._at_start(text)
            elif self._state == _REASONING:
                text = self._in_reasoning(text)
            else:
                self._add_answer(text)
                text = ""
        return self._take()

    def finish_streaming(self) -> DeltaMessage | None:
        """Whatever was held back, once the output is complete."""
        if self._state == _PREFIX:
            self._state = _REASONING if self.implicit_start else _CONTENT_ONLY
        if self._state == _REASONING:
            self._reasoning.add(self._held)
        else:
            self._add_answer(self._held)
        self._held = ""
        self._reasoning.close()
        self._answer.close()
        return self._take()

    def _at_start(self, text: str) -> str:
        text, self._held = self._held + text, ""
        opened = text.lstrip()
        if opened.startswith(START):
            self._state = _REASONING
            return opened[len(START):]
        if START.startswith(opened):  # whitespace so far, or <think> in the making
            self._held = text
            return ""
        self._state = _REASONING if self.implicit_start else _CONTENT_ONLY
        return text

    def _in_reasoning(self, text: str) -> str:
        text, self._held = self._held + text, ""
        end = text.find(END)
        if end < 0:
            keep = len(text) - partial_tag_len(text, END)
            self._reasoning.add(text[:keep])
            self._held = text[keep:]
            return ""
        self._reasoning.add(text[:end])
        self._reasoning.close()
        self._state = _ANSWER
        return text[end + len(END):]

    def _add_answer(self, text: str) -> None:
        if self._state == _ANSWER and not self._answer_begun:
            text = text.lstrip("\n")
            self._answer_begun = bool(text)
        self._answer.add(text)

    def _take(self) -> DeltaMessage | None:
        reasoning, content = self._reasoning.take(), self._answer.take()
        if not reasoning and not content:
            return None
        return DeltaMessage(reasoning_content=reasoning or None, content=content or None)
