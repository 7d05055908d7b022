"""Reader for HLBD (Hierarchical Language Bootstrapping Dataset) files.

An HLBD sample describes one concept at several levels::

    {"concept": "rain",
     "level_1": {"字卡": "雨", "emoji": "🌧️"},
     "level_2": {"短语": "下雨"},
     "level_3": {"数学": "..."},
     "level_4": {"拼音": "xià yǔ"},
     "level_5": {"英文": "It is raining"},
     "level_6": {"中文": "下雨了，出门记得带伞。"},
     "level_7": {"日文": "雨が降っている"},
     "level_8": {"韩文": "비가 와요"}}

:func:`load_hlbd` turns samples into ``(source, target)`` text pairs: by default
each of emoji, 短语, 英文, 拼音, 日文 and 韩文 paired with the 中文 sentence,
in that order, so a complete sample gives six pairs.

Accepted files:

* a JSON file holding a list of samples or ``{"samples": [...]}``;
* any text file (Python source, markdown, ...) containing ``samples = [...]``
  (or ``"samples": [...]``).  The bracketed part is read as JSON when it is
  JSON, otherwise as a Python literal of this subset:

  - strings in single, double or triple quotes, optionally with an ``r`` or
    ``u`` prefix (not ``b`` or ``f``), with Python's escapes (``\\n``,
    ``\\t``, ``\\'``, ``\\"``, ``\\\\``, ``\\xXX``, ``\\uXXXX``,
    ``\\UXXXXXXXX``, octal, ``\\N{NAME}``, backslash-newline); adjacent
    strings are joined, and an escaped surrogate pair such as
    ``\\uD83C\\uDF27`` becomes one character, as in JSON;
  - lists, tuples and dicts (trailing commas allowed), nested at most
    10,000 deep;
  - ints (decimal, hex, octal, binary, ``_`` separators), floats,
    ``True``/``False``/``None`` (and JSON's ``true``/``false``/``null``);
  - ``#`` comments, spaces, tabs and newlines between tokens.

  Anything else (names, calls, operators, sets, bytes) is a ``ValueError``
  naming the file, line and column and what was found.  The parser is
  iterative and builds the values directly, so it needs about as much
  memory as :mod:`json` (``ast.literal_eval`` needed ~100x the file size)
  and finds the closing bracket itself, whatever the strings hold.
"""

from __future__ import annotations

import json
import logging
import os
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

__all__ = [
    "DEFAULT_LEVELS",
    "TARGET_LEVEL",
    "LevelKey",
    "load_hlbd",
    "load_hlbd_samples",
    "samples_to_pairs",
]

logger = logging.getLogger("hlbd_fast")

#: A ``(level, key)`` address inside a sample, e.g. ``("level_5", "英文")``.
LevelKey = tuple[str, str]

#: Default source fields, in the order their pairs are emitted per sample.
DEFAULT_LEVELS: tuple[LevelKey, ...] = (
    ("level_1", "emoji"),
    ("level_2", "短语"),
    ("level_5", "英文"),
    ("level_4", "拼音"),
    ("level_7", "日文"),
    ("level_8", "韩文"),
)

#: Default target field: the Chinese sentence.
TARGET_LEVEL: LevelKey = ("level_6", "中文")

PathLike = Union[str, "os.PathLike[str]"]

_BUNDLED_ORIGIN = "<bundled HLBD sample>"
_SAMPLES_ASSIGN = re.compile(r"(?:(?<![\w.])samples\s*(?::[^=\n]{0,80})?=|[\"']samples[\"']\s*:)\s*\[")
_MAX_UNWRAP = 16


# --------------------------------------------------------------------- parse
class _LiteralError(ValueError):
    """Text outside the accepted literal subset; the message names line and column, not the file."""


#: Deepest list/tuple/dict nesting the literal parser accepts (HLBD samples nest 3 levels).
_MAX_DEPTH = 10_000
_JSON = json.JSONDecoder()
_JSON_START = re.compile(r"\s*[\[{]")
_SKIP = re.compile(r"(?:[ \t\r\n\f]+|#[^\n]*|\\\n)*")
_STRING_OPEN = re.compile(r"([A-Za-z]{0,2})('''|\"\"\"|'|\")")
#: The rest of a string after its opening quote(s), closing quote(s) included.
_STRING_REST = {
    "'''": re.compile(r"[^'\\]*(?:(?:\\.|'(?!''))[^'\\]*)*'''", re.S),
    '"""': re.compile(r'[^"\\]*(?:(?:\\.|"(?!""))[^"\\]*)*"""', re.S),
    "'": re.compile(r"[^'\\\n]*(?:\\.[^'\\\n]*)*'", re.S),
    '"': re.compile(r'[^"\\\n]*(?:\\.[^"\\\n]*)*"', re.S),
}
_ESCAPE = re.compile(
    r"\\(?:(\n)|([0-7]{1,3})|x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})"
    r"|N\{([^}\n]*)\}|(.))",
    re.S,
)
_SIMPLE_ESCAPES = {
    "\\": "\\",
    "'": "'",
    '"': '"',
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
}
_SURROGATE = re.compile("[\ud800-\udfff]")
_NUMBER = re.compile(
    r"[-+]?(?:0[xX](?:_?[0-9a-fA-F])+|0[oO](?:_?[0-7])+|0[bB](?:_?[01])+"
    r"|(?:\d(?:_?\d)*(?:\.(?:\d(?:_?\d)*)?)?|\.\d(?:_?\d)*)(?:[eE][-+]?\d(?:_?\d)*)?)"
)
_NAME = re.compile(r"[A-Za-z_]\w*")
_KEYWORDS: dict[str, Any] = {
    "True": True,
    "False": False,
    "None": None,
    "true": True,
    "false": False,
    "null": None,  # JSON spellings
}
_TOKEN = re.compile(r"[A-Za-z_]\w*|[-+.\d][\w.]*|\S")
_BRACKETS = {"[": "]", "(": ")", "{": "}"}
_NO_KEY = object()
_VALUE = "a value (string, number, list, tuple, dict, True, False or None)"


def _line_col(text: str, pos: int) -> str:
    """``'line L, column C'`` (both from 1) of index ``pos`` in ``text``."""
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return f"line {line}, column {col}"


def _found(text: str, pos: int) -> str:
    """Describe the token at ``text[pos]`` for an error message."""
    if pos >= len(text):
        return "the end of the file"
    m = _TOKEN.match(text, pos)
    token = m.group() if m else text[pos]
    return repr(token[:40] + ("..." if len(token) > 40 else ""))


class _Frame:
    """A list, tuple or dict that is open while parsing."""

    __slots__ = ("opener", "closer", "pos", "items", "key", "commas", "can_close")

    def __init__(self, opener: str, pos: int) -> None:
        """Open ``opener`` (``[``, ``(`` or ``{``) found at index ``pos``."""
        self.opener = opener
        self.closer = _BRACKETS[opener]
        self.pos = pos
        self.items: Any = {} if opener == "{" else []
        self.key: Any = _NO_KEY
        self.commas = 0
        self.can_close = True  # right after the opener or a comma

    def add(self, value: Any) -> None:
        """Append ``value`` (or store it under the pending dict key)."""
        if self.opener == "{":
            self.items[self.key] = value
            self.key = _NO_KEY
        else:
            self.items.append(value)

    def finish(self) -> Any:
        """The finished value; ``(x)`` without a comma is ``x`` as in Python."""
        if self.opener != "(":
            return self.items
        if self.commas == 0 and len(self.items) == 1:
            return self.items[0]
        return tuple(self.items)


def _unexpected(text: str, pos: int, stack: list[_Frame], expected: str) -> _LiteralError:
    """The error for something other than ``expected`` at ``pos``."""
    if pos >= len(text) and stack:
        top = stack[-1]
        return _LiteralError(
            f"no matching closing bracket for {top.opener!r} at {_line_col(text, top.pos)} (reached the end of the file while expecting {expected})"
        )
    return _LiteralError(f"expected {expected} at {_line_col(text, pos)}, found {_found(text, pos)}")


def _escape_value(m: re.Match[str]) -> str | None:
    """The text one :data:`_ESCAPE` match stands for, or None for a malformed escape."""
    newline, octal, x2, u4, u8, name, other = m.groups()
    if newline is not None:
        return ""
    if octal is not None:
        return chr(int(octal, 8))
    code = x2 or u4 or u8
    if code is not None:
        return chr(int(code, 16)) if int(code, 16) <= 0x10FFFF else None
    if name is not None:
        try:
            return unicodedata.lookup(name)
        except KeyError:
            return None
    if other in "xuUN":  # \x, \u, \U or \N without their digits or name
        return None
    return _SIMPLE_ESCAPES.get(other, "\\" + other)  # unknown escapes are kept, as in Python


def _unescape(text: str, body: str, body_start: int) -> str:
    """Apply Python's string escapes to ``body``, found at ``text[body_start]``.

    A ``\\uD83C\\uDF27`` surrogate pair becomes one character, as in JSON.
    """

    def one(m: re.Match[str]) -> str:
        """The replacement for one escape; a malformed one is an error."""
        value = _escape_value(m)
        if value is None:
            raise _LiteralError(
                f"invalid escape {m.group()[:12]!r} in a string at "
                f"{_line_col(text, body_start + m.start())}; write \\xXX, \\uXXXX, "
                "\\UXXXXXXXX (at most 0010FFFF) or \\N{a Unicode character name}"
            )
        return value

    out = _ESCAPE.sub(one, body)
    if _SURROGATE.search(out):
        out = out.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    return out


def _one_string(text: str, pos: int) -> tuple[str, int]:
    """Read one (possibly r/u-prefixed, possibly triple-quoted) string at ``pos``."""
    m = _STRING_OPEN.match(text, pos)
    assert m is not None  # callers checked
    prefix, quote = m.groups()
    if prefix.lower() not in ("", "r", "u"):
        raise _LiteralError(
            f"{prefix}{quote}...{quote} string at {_line_col(text, pos)}: only plain, r and u strings are accepted (not bytes or f-strings); remove the prefix"
        )
    rest = _STRING_REST[quote].match(text, m.end())
    if rest is None:
        hint = "; a one-line string cannot span lines (use \\n)" if len(quote) == 1 else ""
        raise _LiteralError(f"unterminated string starting at {_line_col(text, pos)}{hint}")
    end = rest.end()
    body = text[m.end() : end - len(quote)]
    if prefix in ("r", "R") or "\\" not in body:
        return body, end
    return _unescape(text, body, m.end()), end


def _strings(text: str, pos: int) -> tuple[str, int]:
    """Read a string at ``pos`` and join the string literals right after it, as Python does."""
    parts: list[str] = []
    while True:
        value, pos = _one_string(text, pos)
        parts.append(value)
        nxt = _SKIP.match(text, pos).end()  # type: ignore[union-attr]
        if not _STRING_OPEN.match(text, nxt):
            return (parts[0] if len(parts) == 1 else "".join(parts)), pos
        pos = nxt


def _number(text: str, pos: int, s: str) -> int | float:
    """The int or float written ``s`` at ``text[pos]``."""
    try:
        if s.lstrip("+-")[:2].lower() in ("0x", "0o", "0b") or not any(c in s for c in ".eE"):
            return int(s, 0)
        return float(s)
    except ValueError as e:
        raise _LiteralError(f"invalid number {s[:40]!r} at {_line_col(text, pos)} ({e}); decimal integers cannot start with 0") from None


def _scalar(text: str, pos: int, stack: list[_Frame]) -> tuple[Any, int]:
    """Read a string, number, True/False/None (or true/false/null) at ``pos``."""
    if _STRING_OPEN.match(text, pos):
        return _strings(text, pos)
    m = _NUMBER.match(text, pos)
    if m:
        return _number(text, pos, m.group()), m.end()
    m = _NAME.match(text, pos)
    if m and m.group() in _KEYWORDS:
        return _KEYWORDS[m.group()], m.end()
    raise _unexpected(text, pos, stack, _VALUE)


def _dict_key(text: str, pos: int, key: Any, keys: dict[str, str]) -> Any:
    """Check that ``key`` can be a dict key; strings are shared, as :mod:`json` does."""
    if isinstance(key, str):
        return keys.setdefault(key, key)
    try:
        hash(key)
    except TypeError:
        raise _LiteralError(f"a {type(key).__name__} cannot be a dict key (before {_line_col(text, pos)}); use a string") from None
    return key


def _deliver(text: str, pos: int, stack: list[_Frame], value: Any, keys: dict[str, str]) -> tuple[Any, int, bool]:
    """Put a finished ``value`` into the open containers, closing those that end here.

    Returns ``(value, end, True)`` once the outermost value is complete, else
    ``(None, pos, False)`` with ``pos`` where the next value starts.
    """
    while stack:
        top = stack[-1]
        pos = _SKIP.match(text, pos).end()  # type: ignore[union-attr]
        if top.opener == "{" and top.key is _NO_KEY:
            top.key = _dict_key(text, pos, value, keys)
            if text.startswith(":", pos):
                top.can_close = False
                return None, pos + 1, False
            raise _unexpected(text, pos, stack, "':' after a dict key")
        top.add(value)
        if text.startswith(",", pos):
            top.commas += 1
            top.can_close = True
            return None, pos + 1, False
        if text.startswith(top.closer, pos):
            value = stack.pop().finish()
            pos += 1
            continue
        where = _line_col(text, top.pos)
        raise _unexpected(text, pos, stack, f"',' or {top.closer!r} (for {top.opener!r} at {where})")
    return value, pos, True


def _parse_literal_at(text: str, pos: int) -> tuple[Any, int]:
    """Parse the Python literal at ``text[pos]`` without recursion; return it and its end.

    Accepts the subset described in the module docstring; containers nest at
    most :data:`_MAX_DEPTH` deep.

    Raises:
        _LiteralError: naming line, column and what was found, for anything else.
    """
    stack: list[_Frame] = []
    keys: dict[str, str] = {}
    while True:
        pos = _SKIP.match(text, pos).end()  # type: ignore[union-attr]
        c = text[pos : pos + 1]
        if c and c in _BRACKETS:
            if len(stack) >= _MAX_DEPTH:
                raise _LiteralError(
                    f"brackets nested deeper than {_MAX_DEPTH} levels at "
                    f"{_line_col(text, pos)}; HLBD samples nest 3 levels, so brackets "
                    "are probably unbalanced"
                )
            stack.append(_Frame(c, pos))
            pos += 1
            continue
        if stack and c == stack[-1].closer and stack[-1].can_close:
            value, pos = stack.pop().finish(), pos + 1
        else:
            value, pos = _scalar(text, pos, stack)
        value, pos, done = _deliver(text, pos, stack, value, keys)
        if done:
            return value, pos


def _parse_array_at(text: str, start: int) -> tuple[Any, int]:
    """Parse the array at ``text[start]``: as JSON (fast) if it is JSON, else as a Python literal."""
    try:
        return _JSON.raw_decode(text, start)
    except (ValueError, RecursionError):  # not JSON (or an int over Python's digit limit)
        pass
    return _parse_literal_at(text, start)


def _samples_from_text(text: str, origin: str) -> list[Any]:
    """Find and parse ``samples = [...]`` in free text."""
    first_error: str | None = None
    found: list[Any] = []
    for m in _SAMPLES_ASSIGN.finditer(text):
        try:
            value, _ = _parse_array_at(text, m.end() - 1)
        except _LiteralError as e:
            if first_error is None:
                first_error = f"'samples = [...]' at {_line_col(text, m.start())} is not a JSON array or a Python literal of the accepted kinds: {e}"
            continue
        if value and all(isinstance(s, dict) for s in value):
            return value  # a real sample list wins over e.g. `samples = []` in prose
        found.append(value)
    if found:
        return found[0]
    if first_error is not None:
        raise ValueError(f"{origin}: {first_error}")
    raise ValueError(
        f"{origin}: no HLBD samples found; looked for a JSON list of samples, a "
        "JSON object with a 'samples' list, a 'samples = [...]' assignment or a "
        "'\"samples\": [...]' entry in the text"
    )


def _load_json(text: str, origin: str) -> tuple[Any, str | None]:
    """``(json.loads(text), None)``, or ``(None, message naming origin)`` when it is not JSON."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"{origin}: not valid JSON ({e.msg} at {_line_col(text, e.pos)})"
    except RecursionError:
        return None, (
            f"{origin}: not valid JSON (brackets nested too deeply for Python's json module; HLBD samples nest 3 levels, so brackets are probably unbalanced)"
        )
    except ValueError as e:  # e.g. an int longer than Python's digit limit
        return None, f"{origin}: not valid JSON ({e})"


def _samples_from_json(data: Any, origin: str) -> list[Any]:
    """The sample list of parsed JSON: the list itself or its ``"samples"`` entry."""
    if isinstance(data, list):
        samples = data
    elif isinstance(data, dict) and isinstance(data.get("samples"), list):
        samples = data["samples"]
    else:
        got = f"an object with keys {sorted(data)[:8]}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise ValueError(f"{origin}: no HLBD samples found; looked for a top-level JSON list of samples or an object with a 'samples' list, got {got}")
    if not samples:
        raise ValueError(f"{origin}: the samples list is empty")
    return samples


def _read_samples(path: PathLike) -> list[Any]:
    """Read the sample list of the HLBD file ``path`` (JSON, or text with ``samples = [...]``)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"HLBD file not found: {p}")
    if p.is_dir():
        raise IsADirectoryError(f"HLBD path is a directory, expected a file: {p}")
    origin = str(p)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{origin}: not UTF-8 text ({e})") from e
    is_json_name = p.suffix.lower() == ".json"
    json_error: str | None = None
    if is_json_name or _JSON_START.match(text):
        data, json_error = _load_json(text, origin)
        if json_error is None:
            return _samples_from_json(data, origin)
        if is_json_name:
            raise ValueError(json_error)
    try:
        samples = _samples_from_text(text, origin)
    except ValueError:
        if json_error is not None:  # looked like JSON: report the JSON problem
            raise ValueError(json_error) from None
        raise
    if not samples:
        raise ValueError(f"{origin}: 'samples = [...]' is an empty list")
    return samples


# -------------------------------------------------------------------- pairs
def _check_level_keys(value: Any, name: str) -> tuple[LevelKey, ...]:
    """``value`` as a tuple of ``(level, key)`` string pairs; ``name`` is used in errors."""
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of (level, key) pairs such as {DEFAULT_LEVELS[:2]!r}, got a string")
    out: list[LevelKey] = []
    for item in value:
        if isinstance(item, (str, bytes)) or len(item) != 2 or not all(isinstance(x, str) and x for x in item):
            raise ValueError(f"{name} entries must be (level, key) pairs of non-empty strings such as ('level_5', '英文'), got {item!r}")
        out.append((item[0], item[1]))
    return tuple(out)


def _field_text(sample: dict[str, Any], level: str, key: str, origin: str, index: int) -> str | None:
    """Text at ``sample[level][key]`` (unwrapping ``{key: {key: text}}``), or None."""
    where = f"{origin}: sample {index}"
    concept = sample.get("concept")
    if isinstance(concept, str) and concept:
        where += f" (concept {concept!r})"
    level_obj = sample.get(level)
    if level_obj is None:
        return None
    if not isinstance(level_obj, dict):
        raise ValueError(f'{where}: {level!r} must be an object like {{{key!r}: "text"}}, got {type(level_obj).__name__}')
    value = level_obj.get(key)
    depth = 0
    while isinstance(value, dict):
        depth += 1
        if key not in value or depth > _MAX_UNWRAP:
            raise ValueError(f"{where}: {level}.{key} is an object without a {key!r} entry; expected text")
        value = value[key]
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: {level}.{key} must be text, got {type(value).__name__} {value!r:.60}")
    value = value.strip()
    return value or None


def samples_to_pairs(
    samples: Sequence[Any],
    levels: Sequence[LevelKey] = DEFAULT_LEVELS,
    target: LevelKey = TARGET_LEVEL,
    *,
    origin: str = "<samples>",
) -> list[tuple[str, str]]:
    """Turn HLBD samples (already parsed dicts) into ``(source, target)`` pairs.

    For each sample, in order, each ``levels`` entry whose text is present and
    non-empty gives ``(that text, target text)``.  A sample without target
    text gives nothing.  Texts are stripped of surrounding whitespace; a value
    ``{key: {key: text}}`` is unwrapped to ``text``; extra keys are ignored.

    Args:
        samples: the sample objects.
        levels: ``(level, key)`` source fields, in output order.
        target: ``(level, key)`` of the target text.
        origin: name used in error messages (usually the file path).

    Raises:
        ValueError: naming ``origin``, the sample index and the key, when a
            sample is not an object or a requested field holds something
            other than text (a number, a list, ...).
    """
    levels_t = _check_level_keys(levels, "levels")
    (target_t,) = _check_level_keys([target], "target")
    if isinstance(samples, (str, bytes, dict)):
        raise ValueError(f"{origin}: samples must be a list of sample objects")
    pairs: list[tuple[str, str]] = []
    for index, sample in enumerate(samples):
        if not isinstance(sample, dict):
            raise ValueError(f"{origin}: sample {index} must be an object (dict) with 'level_N' keys, got {type(sample).__name__} {sample!r:.60}")
        tgt = _field_text(sample, *target_t, origin, index)
        sources = [_field_text(sample, lv, key, origin, index) for lv, key in levels_t]
        if tgt is None:
            continue
        pairs.extend((src, tgt) for src in sources if src is not None)
    return pairs


def load_hlbd_samples(path: PathLike | None = None) -> list[Any]:
    """Read the raw sample objects of an HLBD file (or the bundled sample).

    Args:
        path: file to read; ``None`` gives a fresh copy of the bundled sample.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: naming the file, when it is not JSON where JSON is
            expected or holds no samples (the message says what was looked for).
    """
    if path is None:
        from .bundled import bundled_samples

        return list(bundled_samples())
    return _read_samples(path)


def load_hlbd(
    path: PathLike | None = None,
    levels: Sequence[LevelKey] = DEFAULT_LEVELS,
    target: LevelKey = TARGET_LEVEL,
) -> list[tuple[str, str]]:
    """Load HLBD ``(source, target)`` text pairs.

    Args:
        path: an HLBD file (JSON, or text containing ``samples = [...]``);
            ``None`` uses the bundled 100-concept sample (600 pairs).
        levels: source fields as ``(level, key)`` pairs, in per-sample output
            order; default :data:`DEFAULT_LEVELS` (emoji, 短语, 英文, 拼音,
            日文, 韩文).
        target: target field, default :data:`TARGET_LEVEL` (``level_6.中文``).

    Returns:
        Pairs of two non-empty strings, in file order.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: naming the file (and sample index and key where it
            applies) for malformed files, files without samples, or files
            whose samples give no pair for ``levels``/``target``.
    """
    origin = _BUNDLED_ORIGIN if path is None else str(Path(path))
    samples = load_hlbd_samples(path)
    pairs = samples_to_pairs(samples, levels, target, origin=origin)
    if not pairs:
        raise ValueError(
            f"{origin}: {len(samples)} samples but no (source, target) pair: no "
            f"sample has text for both the target {tuple(target)!r} and one of "
            f"the levels {tuple(tuple(x) for x in levels)!r}"
        )
    logger.debug("load_hlbd: %d pairs from %d samples in %s", len(pairs), len(samples), origin)
    return pairs
