"""JSON for tool calls, whole and incremental.

`loads_prefix` / `dumps` are the non-streaming parse and the re-serialization a call's
arguments get. `IncrementalJson` reads the same JSON fed in pieces and writes out, as
soon as each part is final, exactly the text `dumps` gives for the whole value, so the
arguments streamed piece by piece add up to the non-streaming arguments, byte for byte
(a model may write `{"a":1}` or `\\u00e9`; both paths send `{"a": 1}` and `é`).

Both reject what `json` alone would let through but a client cannot read back the same:
duplicate keys (the last one would win), NaN / Infinity and numbers too large for a float.
Control characters inside strings are accepted (`strict=False`): models write raw newlines
into code arguments, and the output escapes them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

JSON_WS = " \t\n\r"
# A lone surrogate cannot be encoded as UTF-8: it stays a \\u escape (same JSON value).
_SURROGATE = re.compile("[\\ud800-\\udfff]")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_LITERALS = ("true", "false", "null")
_READ_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
# What json.dumps(ensure_ascii=False) escapes: quote, backslash and control characters.
_WRITE_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(strict=False, object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def loads_prefix(text: str, pos: int) -> tuple[Any, int]:
    """The JSON value starting exactly at text[pos], and the index just past it.
    Raises ValueError when there is none."""
    try:
        return _DECODER.raw_decode(text, pos)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


def dumps(value: Any) -> str:
    """A call's arguments as sent: json.dumps(ensure_ascii=False). Raises ValueError
    for a number that overflowed to infinity."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    return _SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in JSON_WS:
        pos += 1
    return pos


class JsonSyntaxError(ValueError):
    pass


@dataclass
class Span:
    """Where a value lies in IncrementalJson.text; end is None while the value is open."""

    start: int
    end: int | None = None


class _Frame:
    """An open object or array; key is the current key (object) or index (array)."""

    __slots__ = ("is_object", "key", "keys", "span")

    def __init__(self, is_object: bool, span: Span | None) -> None:
        self.is_object = is_object
        self.key: str | int | None = None if is_object else 0
        self.keys: set[str] = set()
        self.span = span


# What the next character may be.
(_VALUE, _FIRST_ITEM, _FIRST_KEY, _KEY, _COLON, _AFTER_VALUE,
 _STRING, _ESCAPE, _UNICODE, _NUMBER_TOKEN, _LITERAL) = range(11)


class IncrementalJson:
    """One JSON object or array, fed in pieces of any size.

    `text` is the re-serialized text of what is final so far (a number shows once the
    character after it arrives; a string grows character by character). `spans` maps the
    path of each value at most `span_depth` levels deep (keys and array indices; () is
    the root) to where it lies in `text`. `feed` stops at the end of the document or at
    the first character that cannot continue it (`failed`), and says how much it used.
    """

    def __init__(self, span_depth: int) -> None:
        self.text = ""
        self.spans: dict[tuple[str | int, ...], Span] = {}
        self.done = False
        self.failed = False
        self._span_depth = span_depth
        self._stack: list[_Frame] = []
        self._state = _VALUE
        self._pieces: list[str] = []  # output of the current feed, joined onto text at its end
        self._length = 0  # len(text) + what _pieces hold
        self._scalar: Span | None = None  # the span of the string / number / literal being read
        self._token = ""  # the number, literal or \\u hex digits being read
        self._is_key = False
        self._key_chars: list[str] = []
        self._high_surrogate: int | None = None  # a \\uD8xx waiting for its low half

    def feed(self, text: str) -> int:
        if self.failed:
            return 0
        used = len(text)
        for i, char in enumerate(text):
            if self.done:
                used = i
                break
            try:
                self._step(char)
            except JsonSyntaxError:
                self.failed = True
                used = i
                break
        self.text += "".join(self._pieces)
        self._pieces.clear()
        return used

    # ---- the state machine ----------------------------------------------------------

    def _step(self, char: str) -> None:
        state = self._state
        if state == _STRING:
            self._string_char(char)
            return
        if state == _ESCAPE:
            self._escape_char(char)
            return
        if state == _UNICODE:
            self._unicode_char(char)
            return
        if state == _LITERAL:
            self._literal_char(char)
            return
        if state == _NUMBER_TOKEN:
            if char in _NUMBER_CHARS:
                self._token += char
                return
            self._end_number()  # and the character is read after the number
        if char in JSON_WS:
            return
        state = self._state
        if state == _VALUE:
            self._start_value(char)
        elif state == _FIRST_ITEM and char == "]":
            self._close()
        elif state == _FIRST_ITEM:
            self._start_value(char)
        elif state in (_FIRST_KEY, _KEY):
            if char == "}" and state == _FIRST_KEY:
                self._close()
            elif char == '"':
                self._start_string(is_key=True)
            else:
                raise JsonSyntaxError("expected a key")
        elif state == _COLON:
            if char != ":":
                raise JsonSyntaxError("expected ':'")
            self._emit(": ")
            self._state = _VALUE
        else:
            self._after_value(char)

    def _start_value(self, char: str) -> None:
        if not self._stack and char not in "{[":
            raise JsonSyntaxError("expected an object or an array")
        path = tuple(frame.key for frame in self._stack)
        span = None
        if len(path) <= self._span_depth:
            span = self.spans[path] = Span(self._length)
        if char in "{[":
            self._emit(char)
            self._stack.append(_Frame(char == "{", span))
            self._state = _FIRST_KEY if char == "{" else _FIRST_ITEM
            return
        self._scalar = span
        if char == '"':
            self._start_string(is_key=False)
        elif char in "-0123456789":
            self._token = char
            self._state = _NUMBER_TOKEN
        elif char in "tfn":
            self._token = char
            self._state = _LITERAL
        else:
            raise JsonSyntaxError("expected a value")

    def _after_value(self, char: str) -> None:
        frame = self._stack[-1]
        if char == ",":
            self._emit(", ")
            if frame.is_object:
                self._state = _KEY
            else:
                frame.key += 1
                self._state = _VALUE
        elif char == ("}" if frame.is_object else "]"):
            self._close()
        else:
            raise JsonSyntaxError("expected ',' or the end of the object / array")

    def _close(self) -> None:
        frame = self._stack.pop()
        self._emit("}" if frame.is_object else "]")
        if frame.span is not None:
            frame.span.end = self._length
        self._state = _AFTER_VALUE
        self.done = not self._stack

    def _end_scalar(self) -> None:
        if self._scalar is not None:
            self._scalar.end = self._length
        self._state = _AFTER_VALUE

    # ---- scalars ----------------------------------------------------------------------

    def _end_number(self) -> None:
        if not _NUMBER.fullmatch(self._token):
            raise JsonSyntaxError(f"bad number {self._token!r}")
        try:
            self._emit(dumps(json.loads(self._token)))
        except ValueError as exc:  # overflow to infinity, or an int past Python's digit limit
            raise JsonSyntaxError(str(exc)) from exc
        self._end_scalar()

    def _literal_char(self, char: str) -> None:
        self._token += char
        if not any(literal.startswith(self._token) for literal in _LITERALS):
            raise JsonSyntaxError(f"bad literal {self._token!r}")
        if self._token in _LITERALS:
            self._emit(self._token)
            self._end_scalar()

    def _start_string(self, is_key: bool) -> None:
        self._emit('"')
        self._is_key = is_key
        self._key_chars.clear()
        self._state = _STRING

    def _string_char(self, char: str) -> None:
        if char == "\\":
            self._state = _ESCAPE
            return
        self._flush_high_surrogate()
        if char != '"':
            self._char(char)
            return
        self._emit('"')
        if not self._is_key:
            self._end_scalar()
            return
        frame = self._stack[-1]
        key = "".join(self._key_chars)
        if key in frame.keys:
            raise JsonSyntaxError(f"duplicate key {key!r}")
        frame.keys.add(key)
        frame.key = key
        self._state = _COLON

    def _escape_char(self, char: str) -> None:
        if char == "u":
            self._token = ""
            self._state = _UNICODE
            return
        if char not in _READ_ESCAPES:
            raise JsonSyntaxError(f"bad escape \\{char}")
        self._flush_high_surrogate()
        self._char(_READ_ESCAPES[char])
        self._state = _STRING

    def _unicode_char(self, char: str) -> None:
        if char not in _HEX_DIGITS:
            raise JsonSyntaxError("bad \\u escape")
        self._token += char
        if len(self._token) < 4:
            return
        self._state = _STRING
        code = int(self._token, 16)
        high = self._high_surrogate
        if high is not None and 0xDC00 <= code <= 0xDFFF:  # the pair is one character, as json reads it
            self._high_surrogate = None
            self._char(chr(0x10000 + ((high - 0xD800) << 10) + (code - 0xDC00)))
            return
        self._flush_high_surrogate()
        if 0xD800 <= code <= 0xDBFF:
            self._high_surrogate = code
        else:
            self._char(chr(code))

    def _flush_high_surrogate(self) -> None:
        if self._high_surrogate is not None:
            self._char(chr(self._high_surrogate))
            self._high_surrogate = None

    def _char(self, char: str) -> None:
        """One decoded character of a string, written as dumps writes it."""
        if self._is_key:
            self._key_chars.append(char)
        escaped = _WRITE_ESCAPES.get(char)
        if escaped is None and (char < " " or "\ud800" <= char <= "\udfff"):
            escaped = f"\\u{ord(char):04x}"
        self._emit(escaped or char)

    def _emit(self, text: str) -> None:
        self._pieces.append(text)
        self._length += len(text)
