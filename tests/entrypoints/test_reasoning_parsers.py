"""Reasoning parsers on fixed model outputs: the thinking and answer they split out,
and the streamed deltas, fed in every split, adding up to the same two parts."""

from __future__ import annotations

import random

import pytest

from pagedllm.entrypoints.openai.reasoning_parsers import REASONING_PARSERS, ReasoningParser, get_reasoning_parser

QWEN3 = get_reasoning_parser("qwen3")
DEEPSEEK_R1 = get_reasoning_parser("deepseek_r1")


def stream(parser_cls: type[ReasoningParser], pieces: list[str]) -> tuple[str | None, str | None]:
    """Feeds the pieces and reassembles (reasoning_content, content); thinking comes first."""
    parser = parser_cls()
    deltas = [parser.extract_reasoning_streaming(piece) for piece in pieces] + [parser.finish_streaming()]
    reasoning, content = "", ""
    for delta in filter(None, deltas):
        assert delta.reasoning_content or delta.content, "an empty delta is None"
        assert delta.role is None and delta.tool_calls is None
        if delta.reasoning_content:
            assert not content, "thinking after the answer began"
        reasoning += delta.reasoning_content or ""
        content += delta.content or ""
    return reasoning or None, content or None


def splits(text: str) -> list[list[str]]:
    """The text one character at a time, cut in two at every point, and cut at random
    points (fixed seed)."""
    out = [list(text)] + [[text[:cut], text[cut:]] for cut in range(1, len(text))]
    rng = random.Random(4321)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) if len(text) > 1 else []
        out.append([text[start:end] for start, end in zip([0] + cuts, cuts + [len(text)])])
    return out


def check(parser_cls: type[ReasoningParser], text: str, expected: tuple[str | None, str | None]) -> None:
    assert parser_cls().extract_reasoning(text) == expected
    for pieces in splits(text):
        assert stream(parser_cls, pieces) == expected, pieces


def test_registry():
    assert set(REASONING_PARSERS) == {"qwen3", "deepseek_r1"}
    assert get_reasoning_parser("qwen3") is QWEN3
    with pytest.raises(ValueError, match="deepseek_r1.*qwen3"):
        get_reasoning_parser("granite")


@pytest.mark.parametrize("text, expected", [
    ("<think>\nThe user greets me. I greet back.\n</think>\n\nHello! How can I help?",
     ("\nThe user greets me. I greet back.\n", "Hello! How can I help?")),
    # tags and near-tags inside the text; only the first </think> ends the thinking
    ("<think>Is 1 < 2? Yes. <thinking> is not a tag, nor </thin k>.</think>\nAnswer: 1 < 2, see </think>.",
     ("Is 1 < 2? Yes. <thinking> is not a tag, nor </thin k>.", "Answer: 1 < 2, see </think>.")),
    ("  <think>ü 你好 🙂</think>Ja.", ("ü 你好 🙂", "Ja.")),
    ("<think>\n\n</think>\n\nThinking was empty.", (None, "Thinking was empty.")),
    ("<think>Only thought.</think>\n\n", ("Only thought.", None)),
    # thinking disabled: no </think> at all, the whole output is the answer
    ("Hello! No thinking here.", (None, "Hello! No thinking here.")),
    ("A <think> later is not thinking.</think> x", (None, "A <think> later is not thinking.</think> x")),
    ("<thin", (None, "<thin")),
    ("\n  ", (None, None)),
    ("", (None, None)),
])
def test_qwen3(text, expected):
    check(QWEN3, text, expected)


def test_qwen3_thinking_that_never_ends():
    """Whole, an output without </think> is the answer; streamed, an output that opened
    with <think> has sent its thinking as thinking before the end shows none came."""
    text = "<think>Still thinking when max_tokens hit"
    assert QWEN3().extract_reasoning(text) == (None, text)
    for pieces in splits(text):
        assert stream(QWEN3, pieces) == ("Still thinking when max_tokens hit", None)


@pytest.mark.parametrize("text, expected", [
    # the template opened <think>: the output starts as thinking
    ("The user wants 2+2. That is 4.\n</think>\n\nThe answer is 4.",
     ("The user wants 2+2. That is 4.\n", "The answer is 4.")),
    ("<think>\nRepeated start tag.</think>Answer.", ("\nRepeated start tag.", "Answer.")),
    ("Braces { and \"quotes\" < > </thi</think>\n\n\nÉté 🌞", ('Braces { and "quotes" < > </thi', "Été 🌞")),
    # no </think>: everything is thinking
    ("Thinking, cut short by max_tokens", ("Thinking, cut short by max_tokens", None)),
    ("Ends with half a tag </thi", ("Ends with half a tag </thi", None)),
    ("</think>Straight to the answer.", (None, "Straight to the answer.")),
    ("  \n</think>\n", (None, None)),
    ("", (None, None)),
])
def test_deepseek_r1(text, expected):
    check(DEEPSEEK_R1, text, expected)


def test_streaming_sends_text_as_soon_as_it_cannot_be_a_tag():
    parser = DEEPSEEK_R1()
    assert parser.extract_reasoning_streaming("First thought </th").reasoning_content == "First thought"
    delta = parser.extract_reasoning_streaming("ink>\n\nThe answer")
    assert (delta.reasoning_content, delta.content) == (" ", "The answer")  # held until text followed
    assert parser.extract_reasoning_streaming(" is 4.").content == " is 4."
    assert parser.finish_streaming() is None
    parser = QWEN3()
    assert parser.extract_reasoning_streaming("<th") is None  # may open the thinking
    assert parser.extract_reasoning_streaming("e answer").content == "<the answer"
