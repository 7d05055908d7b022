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
  (or ``"samples": [...]``) where the bracketed part is a JSON array (a Python list literal of plain
  strings, numbers and dicts is accepted too).  The closing bracket is found
  by a scanner that skips brackets inside string literals.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
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
_SAMPLES_ASSIGN = re.compile(
    r"(?:(?<![\w.])samples\s*(?::[^=\n]{0,80})?=|[\"']samples[\"']\s*:)\s*\["
)
_MAX_UNWRAP = 16


# --------------------------------------------------------------------- parse
def _match_bracket(text: str, start: int) -> int:
    """Index just past the bracket matching ``text[start] == '['``, or -1.

    String literals (double or single quoted, with backslash escapes) and
    ``#`` comments are skipped, so brackets inside them do not count.
    """
    depth = 0
    i = start
    n = len(text)
    while i < n:
        c = text[i]
        if c == '"' or c == "'":
            quote = c
            i += 1
            while i < n:
                d = text[i]
                if d == "\\":
                    i += 2
                    continue
                if d == quote:
                    break
                if d == "\n" and quote == "'":
                    break
                i += 1
        elif c == "#":
            nl = text.find("\n", i)
            i = n if nl < 0 else nl
            continue
        elif c == "[" or c == "{":
            depth += 1
        elif c == "]" or c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def _parse_literal(chunk: str) -> Any:
    """Parse a JSON array, falling back to a Python literal (trailing commas, quotes)."""
    try:
        return json.loads(chunk)
    except json.JSONDecodeError as json_err:
        try:
            return ast.literal_eval(chunk)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise json_err from None


def _line_col(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return f"line {line}, column {col}"


def _samples_from_text(text: str, origin: str) -> list[Any]:
    """Find and parse ``samples = [...]`` in free text."""
    first_error: str | None = None
    found: list[list[Any]] = []
    for m in _SAMPLES_ASSIGN.finditer(text):
        start = m.end() - 1
        end = _match_bracket(text, start)
        if end < 0:
            if first_error is None:
                first_error = (
                    f"'samples = [' at {_line_col(text, m.start())} has no "
                    "matching closing bracket"
                )
            continue
        chunk = text[start:end]
        try:
            value = _parse_literal(chunk)
        except json.JSONDecodeError as e:
            if first_error is None:
                first_error = (
                    f"'samples = [...]' at {_line_col(text, m.start())} is not a "
                    f"JSON array ({e.msg} at {_line_col(text, start + e.pos)})"
                )
            continue
        if isinstance(value, list):
            found.append(value)
    for value in found:  # prefer a real sample list over e.g. `samples = []` in prose
        if value and all(isinstance(s, dict) for s in value):
            return value
    if found:
        return found[0]
    if first_error is not None:
        raise ValueError(f"{origin}: {first_error}")
    raise ValueError(
        f"{origin}: no HLBD samples found; looked for a JSON list of samples, a "
        "JSON object with a 'samples' list, a 'samples = [...]' assignment or a "
        "'\"samples\": [...]' entry in the text"
    )


def _read_samples(path: PathLike) -> list[Any]:
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
    stripped = text.lstrip()
    is_json_name = p.suffix.lower() == ".json"
    json_error: str | None = None
    if is_json_name or stripped[:1] in ("[", "{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            json_error = f"{origin}: not valid JSON ({e.msg} at {_line_col(text, e.pos)})"
            if is_json_name:
                raise ValueError(json_error) from e
        else:
            if isinstance(data, list):
                samples = data
            elif isinstance(data, dict) and isinstance(data.get("samples"), list):
                samples = data["samples"]
            else:
                raise ValueError(
                    f"{origin}: no HLBD samples found; looked for a top-level JSON "
                    "list of samples or an object with a 'samples' list, got "
                    + (
                        f"an object with keys {sorted(data)[:8]}"
                        if isinstance(data, dict)
                        else f"a JSON {type(data).__name__}"
                    )
                )
            if not samples:
                raise ValueError(f"{origin}: the samples list is empty")
            return samples
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
    if isinstance(value, (str, bytes)):
        raise ValueError(
            f"{name} must be a sequence of (level, key) pairs such as "
            f"{DEFAULT_LEVELS[:2]!r}, got a string"
        )
    out: list[LevelKey] = []
    for item in value:
        if (
            isinstance(item, (str, bytes))
            or len(item) != 2
            or not all(isinstance(x, str) and x for x in item)
        ):
            raise ValueError(
                f"{name} entries must be (level, key) pairs of non-empty strings "
                f"such as ('level_5', '英文'), got {item!r}"
            )
        out.append((item[0], item[1]))
    return tuple(out)


def _field_text(
    sample: dict[str, Any], level: str, key: str, origin: str, index: int
) -> str | None:
    """Text at ``sample[level][key]`` (unwrapping ``{key: {key: text}}``), or None."""
    where = f"{origin}: sample {index}"
    concept = sample.get("concept")
    if isinstance(concept, str) and concept:
        where += f" (concept {concept!r})"
    level_obj = sample.get(level)
    if level_obj is None:
        return None
    if not isinstance(level_obj, dict):
        raise ValueError(
            f"{where}: {level!r} must be an object like {{{key!r}: \"text\"}}, "
            f"got {type(level_obj).__name__}"
        )
    value = level_obj.get(key)
    depth = 0
    while isinstance(value, dict):
        depth += 1
        if key not in value or depth > _MAX_UNWRAP:
            raise ValueError(
                f"{where}: {level}.{key} is an object without a {key!r} entry; "
                "expected text"
            )
        value = value[key]
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(
            f"{where}: {level}.{key} must be text, got {type(value).__name__} {value!r:.60}"
        )
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
            raise ValueError(
                f"{origin}: sample {index} must be an object (dict) with "
                f"'level_N' keys, got {type(sample).__name__} {sample!r:.60}"
            )
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
