"""Tool-call parsers on fixed model outputs: the calls and content they find, and the
streamed pieces, fed in every split, adding up to the same calls and content."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.entrypoints.openai.tool_parsers import TOOL_PARSERS, ExtractedToolCalls, ToolParser, get_tool_parser
from pagedllm.entrypoints.openai.tool_parsers.json_stream import IncrementalJson, dumps, loads_prefix

CALL_ID = re.compile(r"call_[0-9a-f]{24}")


@dataclass
class Streamed:
    calls: list[tuple[str, str]]  # (name, arguments) by index
    content: str | None
    tools_called: bool
    argument_pieces: int


def stream(parser_cls: type[ToolParser], pieces: list[str]) -> Streamed:
    """Feeds the pieces, checks the shape of every delta, and reassembles them."""
    parser = parser_cls()
    deltas = [parser.extract_tool_calls_streaming(piece) for piece in pieces] + [parser.finish_streaming()]
    content, names, arguments, argument_pieces = "", [], [], 0
    for delta in filter(None, deltas):
        assert delta.content or delta.tool_calls, "an empty delta is None"
        assert delta.role is None and delta.reasoning_content is None
        content += delta.content or ""
        for piece in delta.tool_calls or []:
            if piece.id is not None:  # a call's first piece: id, type and name, no arguments
                assert piece.index == len(names) and CALL_ID.fullmatch(piece.id)
                assert piece.type == "function" and piece.function.name and piece.function.arguments is None
                names.append(piece.function.name)
                arguments.append("")
            else:  # later pieces: a non-empty piece of the arguments of a call already begun
                assert piece.index < len(names) and piece.type is None and piece.function.name is None
                assert piece.function.arguments
                arguments[piece.index] += piece.function.arguments
                argument_pieces += 1
    assert parser.tools_called == bool(names)
    return Streamed(list(zip(names, arguments)), content or None, parser.tools_called, argument_pieces)


def splits(text: str) -> list[list[str]]:
    """The text one character at a time, cut in two at every point, and cut at random
    points (fixed seed)."""
    out = [list(text)] + [[text[:cut], text[cut:]] for cut in range(1, len(text))]
    rng = random.Random(1234)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) if len(text) > 1 else []
        out.append([text[start:end] for start, end in zip([0] + cuts, cuts + [len(text)])])
    return out


def check_stream_matches(parser_cls: type[ToolParser], text: str) -> ExtractedToolCalls:
    """The streamed result, in every split, equals the non-streaming one (arguments as text)."""
    whole = parser_cls().extract_tool_calls(text)
    for call in whole.tool_calls:
        assert CALL_ID.fullmatch(call.id) and call.type == "function"
        assert isinstance(json.loads(call.function.arguments), dict)
    expected = [(call.function.name, call.function.arguments) for call in whole.tool_calls]
    for pieces in splits(text):
        result = stream(parser_cls, pieces)
        assert (result.calls, result.content) == (expected, whole.content), pieces
    return whole


def calls_of(result: ExtractedToolCalls) -> list[tuple[str, dict]]:
    return [(call.function.name, json.loads(call.function.arguments)) for call in result.tool_calls]


def test_registry():
    assert set(TOOL_PARSERS) == {"hermes", "llama3_json", "required"}
    assert get_tool_parser("hermes") is TOOL_PARSERS["hermes"]
    with pytest.raises(ValueError, match="hermes.*llama3_json.*required"):
        get_tool_parser("mistral")


# ---- hermes -----------------------------------------------------------------------------

HERMES = get_tool_parser("hermes")


def hermes_call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


@pytest.mark.parametrize("text, calls, content", [
    (hermes_call("get_weather", '{"city": "Paris"}'), [("get_weather", '{"city": "Paris"}')], None),
    ("Let me check both.\n" + hermes_call("get_weather", '{"city": "Paris"}') + "\n"
     + hermes_call("get_time", '{"tz": "Europe/Paris", "format": 24}') + "\nDone.",
     [("get_weather", '{"city": "Paris"}'), ("get_time", '{"tz": "Europe/Paris", "format": 24}')],
     "Let me check both.Done."),
    # re-serialized: spacing, escapes that need none, numbers as Python writes them
    ('<tool_call>{"name":"f","arguments":{"a":1,"b":[1.50,2E2,-0],"c":"\\u00e9\\/"}}</tool_call>',
     [("f", '{"a": 1, "b": [1.5, 200.0, 0], "c": "é/"}')], None),
    # braces, quotes, the end tag and raw newlines inside strings
    (hermes_call("run", '{"code": "if (x) { y = \\"}\\"; }\\n", "note": "</tool_call> {\\"a\\": 1}", '
                        '"raw": "line1\nline2", "deep": {"a": {"b": [{"c": "]}"}]}}}'),
     [("run", '{"code": "if (x) { y = \\"}\\"; }\\n", "note": "</tool_call> {\\"a\\": 1}", '
              '"raw": "line1\\nline2", "deep": {"a": {"b": [{"c": "]}"}]}}}')], None),
    # unicode, written raw or escaped (a surrogate pair is one character)
    (hermes_call("translate",
                 '{"text": "héllo wörld 你好 🙂", "esc": "\\ud83d\\ude42 \\u4f60", "ctrl": "\\u0001"}'),
     [("translate", '{"text": "héllo wörld 你好 🙂", "esc": "🙂 你", "ctrl": "\\u0001"}')], None),
    # no arguments; the name after the arguments; other keys ignored
    ('<tool_call>{"name": "now"}</tool_call>', [("now", "{}")], None),
    ('<tool_call>{"arguments": {"x": [true, false, null]}, "id": 7, "name": "g"}</tool_call>',
     [("g", '{"x": [true, false, null]}')], None),
    # the output ends before </tool_call>
    ('Sure.\n<tool_call>\n{"name": "f", "arguments": {"k": "v"}}', [("f", '{"k": "v"}')], "Sure."),
    ('<tool_call>{"name": "f", "arguments": {}}\n</tool', [("f", "{}")], "</tool"),
    # no calls
    ("Just an answer, with a < b and <b>bold</b>.", [], "Just an answer, with a < b and <b>bold</b>."),
    ("An answer that ends in <tool_c", [], "An answer that ends in <tool_c"),
    ("  \n ", [], None),
    ("", [], None),
])
def test_hermes(text, calls, content):
    result = check_stream_matches(HERMES, text)
    assert [(call.function.name, call.function.arguments) for call in result.tool_calls] == calls
    assert result.content == content


@pytest.mark.parametrize("bad", [
    '<tool_call>\n{"name": "f" "arguments": {"a": 1}}\n</tool_call>',  # missing comma
    "<tool_call>\nnot json at all\n</tool_call>",
    '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>',  # no name
    '<tool_call>{"name": "", "arguments": {}}</tool_call>',
    '<tool_call>{"name": 3, "arguments": {}}</tool_call>',
    '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',  # arguments not an object
    '<tool_call>{"name": "f", "name": "g", "arguments": {}}</tool_call>',  # duplicate key
    '<tool_call>[{"name": "f", "arguments": {}}]</tool_call>',
    "<tool_call>{\"name",  # cut short before the call could start
])
def test_hermes_malformed_call_is_content(bad):
    text = "Before.\n" + bad + "\n" + hermes_call("ok", '{"n": 1}') + "\nAfter."
    result = check_stream_matches(HERMES, text)
    if bad.endswith("</tool_call>"):
        assert calls_of(result) == [("ok", {"n": 1})]
        assert result.content == "Before.\n" + bad + "After."
    else:  # no </tool_call>: the rest of the output is that tag's text
        assert result.tool_calls == [] and result.content == text


def test_hermes_streams_arguments_as_they_come():
    """The call starts once its name and arguments begin, and the arguments follow in
    pieces before the call is complete; content is not held back beyond a possible tag."""
    parser = HERMES()
    first = parser.extract_tool_calls_streaming("Checking <tool")
    assert first.content == "Checking" and first.tool_calls is None
    assert parser.extract_tool_calls_streaming('_call>{"name": "search"') is None
    assert not parser.tools_called
    start = parser.extract_tool_calls_streaming(', "arguments": {"q": "pa')
    assert parser.tools_called
    header, args = start.tool_calls
    assert header.function.name == "search" and args.function.arguments == '{"q": "pa'
    assert start.content is None  # the space before the tag separates, it is not content
    assert parser.extract_tool_calls_streaming("ris").tool_calls[0].function.arguments == "ris"
    assert parser.extract_tool_calls_streaming('", "n": 12').tool_calls[0].function.arguments == '", "n": '
    assert parser.extract_tool_calls_streaming("}").tool_calls[0].function.arguments == "12}"
    assert parser.extract_tool_calls_streaming("}</tool_call>\n") is None
    assert parser.finish_streaming() is None


def test_hermes_call_cut_short_after_it_started():
    """What was sent stays sent; the tag's rest is dropped and later text is content again."""
    text = '<tool_call>{"name": "f", "arguments": {"a": [1, 2</tool_call>\nThen text.'
    assert HERMES().extract_tool_calls(text) == ExtractedToolCalls([], text)
    for pieces in splits(text):
        result = stream(HERMES, pieces)
        assert result.calls == [("f", '{"a": [1, 2')] and result.content == "Then text."


# ---- llama3_json ------------------------------------------------------------------------

LLAMA = get_tool_parser("llama3_json")


@pytest.mark.parametrize("text, calls, content", [
    ('{"name": "get_weather", "parameters": {"city": "San Francisco, CA"}}',
     [("get_weather", '{"city": "San Francisco, CA"}')], None),
    ('<|python_tag|>{"name": "a", "parameters": {"q": "x; y"}}; {"name": "b", "arguments": {"k": {"n": [1]}}}',
     [("a", '{"q": "x; y"}'), ("b", '{"k": {"n": [1]}}')], None),
    (' \n{"name":"f","parameters":{"s":"{\\"}\\" ; ]","u":"ünï 😀"}};{"name":"g","parameters":{}}',
     [("f", '{"s": "{\\"}\\" ; ]", "u": "ünï 😀"}'), ("g", "{}")], None),
    ('{"name": "f", "parameters": {}} {"name": "g"}', [("f", "{}"), ("g", "{}")], None),
    ('{"name": "f", "parameters": {}};\n', [("f", "{}")], None),
    # text after the calls, and a call that is not one after a good call
    ('{"name": "f", "parameters": {"a": 1}}\nHope that helps.', [("f", '{"a": 1}')], "Hope that helps."),
    ('{"name": "f", "parameters": {}}; {"name": "g", "parameters": [1]}', [("f", "{}")],
     '{"name": "g", "parameters": [1]}'),
    ('{"name": "f", "parameters": {}}; ; x', [("f", "{}")], "; x"),
    # not calls: the whole output is content
    ("The weather is sunny.", [], "The weather is sunny."),
    ('Answer: {"name": "f", "parameters": {}}', [], 'Answer: {"name": "f", "parameters": {}}'),
    ('{"city": "Paris"}', [], '{"city": "Paris"}'),
    ('  {"name": "f", "parameters" {"a": 1}}', [], '  {"name": "f", "parameters" {"a": 1}}'),
    ("<|python_tag|>print(1)", [], "<|python_tag|>print(1)"),
    ("<|python_tag|>", [], "<|python_tag|>"),
    ('{"name": "f", "para', [], '{"name": "f", "para'),
    ("", [], None),
])
def test_llama3_json(text, calls, content):
    result = check_stream_matches(LLAMA, text)
    assert [(call.function.name, call.function.arguments) for call in result.tool_calls] == calls
    assert result.content == content


# ---- required ---------------------------------------------------------------------------

REQUIRED = get_tool_parser("required")


@pytest.mark.parametrize("text, calls, content", [
    ('[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]',
     [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")], None),
    ('\n[ {"parameters" : {"q":"[{\\"name\\": \\"x\\"}]", "é": "ü 🚀"} ,"name":"search"} ]',
     [("search", '{"q": "[{\\"name\\": \\"x\\"}]", "é": "ü 🚀"}')], None),
    ('[{"name": "f", "parameters": {"nested": {"a": [{"b": {}}], "s": "}]"}}}]',
     [("f", '{"nested": {"a": [{"b": {}}], "s": "}]"}}')], None),
    ("[]", [], None),
    # cut short (max_tokens): the complete calls before the cut
    ('[{"name": "a", "parameters": {}}, {"name": "b", "param', [("a", "{}")], None),
    ('[{"name": "a", "parameters": {}}, {"name": "b", "parameters": {"x": 1}} garbage',
     [("a", "{}"), ("b", '{"x": 1}')], None),
    # not an array of calls: content
    ('[{"nam', [], '[{"nam'),
    ("I cannot call a tool.", [], "I cannot call a tool."),
    ('{"name": "f", "parameters": {}}', [], '{"name": "f", "parameters": {}}'),
    ('[{"name": "f"}, 1]', [("f", "{}")], None),
    ('[1, {"name": "f"}]', [], '[1, {"name": "f"}]'),
])
def test_required(text, calls, content):
    result = check_stream_matches(REQUIRED, text)
    assert [(call.function.name, call.function.arguments) for call in result.tool_calls] == calls
    assert result.content == content


def test_required_streams_each_call_as_its_element_comes():
    text = '[{"name": "a", "parameters": {"text": "' + "x" * 40 + '"}}, {"name": "b", "parameters": {"n": 1}}]'
    parser, seen = REQUIRED(), []
    for i, char in enumerate(text):
        delta = parser.extract_tool_calls_streaming(char)
        for piece in (delta.tool_calls if delta else None) or []:
            seen.append((i, piece.index, piece.function.name or piece.function.arguments))
    assert parser.finish_streaming() is None
    first_b = next(i for i, index, _ in seen if index == 1)
    assert all(i < first_b for i, index, _ in seen if index == 0)  # call a is complete before b starts
    a_pieces = [part for _, index, part in seen if index == 0]
    assert a_pieces[0] == "a" and len(a_pieces) > 40  # its argument string came char by char
    assert "".join(a_pieces[1:]) == '{"text": "' + "x" * 40 + '"}'
    assert text.index('"b"') < first_b < len(text) - 1  # b starts before the array ends


def test_streamed_arguments_come_in_pieces():
    """One character at a time, a call's arguments go out in several pieces, not at its end."""
    for parser_cls, text in [(HERMES, hermes_call("f", '{"a": "long text here", "b": [1, 2, 3]}')),
                             (LLAMA, '{"name": "f", "parameters": {"a": "long text here", "b": [1, 2, 3]}}'),
                             (REQUIRED, '[{"name": "f", "parameters": {"a": "long text here", "b": [1, 2, 3]}}]')]:
        assert stream(parser_cls, list(text)).argument_pieces > 10


# ---- the incremental JSON under the streams ------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=100, deadline=None)
@given(value=st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=4), indent=st.sampled_from([None, 0, 2]),
       ascii_only=st.booleans(), compact=st.booleans(), seed=st.integers(0, 2**16))
def test_incremental_json_writes_what_dumps_writes(value, indent, ascii_only, compact, seed):
    """Whatever way the JSON is written and cut, the streamed text is dumps' text."""
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only, separators=(",", ":") if compact else None)
    rng = random.Random(seed)
    doc, pos = IncrementalJson(span_depth=1), 0
    while pos < len(text):
        size = rng.randint(1, 8)
        assert doc.feed(text[pos:pos + size]) == len(text[pos:pos + size])
        pos += size
    assert doc.done and not doc.failed
    assert doc.text == dumps(value)
    for key, span in doc.spans.items():
        assert span.end is not None
        if key:
            assert json.loads(doc.text[span.start:span.end]) == value[key[0]]


@pytest.mark.parametrize("text", [
    '{"a": 1,}', '{"a" 1}', "{'a': 1}", '{"a": 01}', '{"a": 1.}', '{"a": -}', '{"a": NaN}', '{"a": tru }',
    '{"a": "\\x"}', '{"a": "\\u12g4"}', '{"a": 1e400}', '{"a": 1, "a": 2}', "[1 2]",
])
def test_incremental_json_refuses_what_the_whole_parse_refuses(text):
    with pytest.raises(ValueError):
        dumps(loads_prefix(text, 0)[0])
    doc = IncrementalJson(span_depth=1)
    used = doc.feed(text)
    assert doc.failed and not doc.done and used < len(text)


@pytest.mark.parametrize("text", ['"top"', "5", "null"])
def test_incremental_json_reads_only_an_object_or_array(text):
    doc = IncrementalJson(span_depth=1)
    assert doc.feed(text) == 0 and doc.failed


def test_incremental_json_stops_at_the_end_of_the_value():
    doc = IncrementalJson(span_depth=1)
    assert doc.feed('{"a": [1, "x"]}  trailing') == len('{"a": [1, "x"]}')
    assert doc.done and doc.text == '{"a": [1, "x"]}' and doc.feed("more") == 0
    assert doc.spans[("a",)].start == doc.text.index("[")


def test_incremental_json_surrogates():
    """A pair of escapes is one character; a lone surrogate stays an escape (not UTF-8)."""
    for text, expected in [('{"s": "\\ud83d\\ude00"}', '{"s": "😀"}'), ('{"s": "\\ud83d"}', '{"s": "\\ud83d"}'),
                           ('{"s": "\\ud83d\\ud83d\\ude00x"}', '{"s": "\\ud83d😀x"}'),
                           ('{"s": "\\udc00\\n"}', '{"s": "\\udc00\\n"}')]:
        doc = IncrementalJson(span_depth=1)
        for char in text:
            doc.feed(char)
        assert doc.text == expected == dumps(json.loads(text))
        expected.encode("utf-8")


# ---- damaged outputs ------------------------------------------------------------------------

DAMAGE = list('{}[]":,;\\ \n<>/aeu0.-') + ["<tool_call>", "</tool_call>", "<|python_tag|>", '"name"', "\\u00e9"]
INTACT = {
    "hermes": 'Hi <tool_call>\n{"name": "f", "arguments": {"a": [1, {"b": "c"}]}}\n</tool_call>\n'
              '<tool_call>{"name": "g", "arguments": {}}</tool_call>',
    "llama3_json": '{"name": "f", "parameters": {"a": [1, {"b": "c"}]}}; {"name": "g", "parameters": {}}',
    "required": '[{"name": "f", "parameters": {"a": [1, {"b": "c"}]}}, {"name": "g", "parameters": {}}]',
}


@pytest.mark.parametrize("name", sorted(TOOL_PARSERS))
def test_damaged_outputs(name):
    """Outputs cut short or with characters dropped and inserted (fixed seed): streaming
    never fails, gives the same in any split, and differs from the whole parse only by
    a call it had started before it broke (pieces already sent cannot be taken back)."""
    rng, parser_cls = random.Random(99), TOOL_PARSERS[name]
    for _ in range(150):
        chars = list(INTACT[name])
        for _ in range(rng.randint(1, 3)):
            if not chars:
                break
            pos, roll = rng.randrange(len(chars)), rng.random()
            if roll < 0.4:
                chars.insert(pos, rng.choice(DAMAGE))
            elif roll < 0.8:
                del chars[pos]
            else:
                del chars[pos:]
        text = "".join(chars)
        whole = parser_cls().extract_tool_calls(text)
        expected = [(call.function.name, call.function.arguments) for call in whole.tool_calls]
        by_char = stream(parser_cls, list(text))
        for pieces in splits(text)[-3:]:
            result = stream(parser_cls, pieces)
            assert (result.calls, result.content) == (by_char.calls, by_char.content), pieces
        if (by_char.calls, by_char.content) != (expected, whole.content):
            assert any(call not in expected for call in by_char.calls), text
