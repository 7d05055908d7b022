"""Tests for the HLBD reader's Python-literal parser (hlbd_fast.data.hlbd)."""

from __future__ import annotations

import ast
import json
import random
import tracemalloc
import warnings
from pathlib import Path
from typing import Any

import pytest

from hlbd_fast.data import load_hlbd, load_hlbd_samples

TQ = '"' * 3  # a triple double quote, kept out of this file's own strings


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _depth(value: Any) -> int:
    """Nesting depth of single-element lists, without recursion."""
    depth = 0
    while isinstance(value, list):
        depth += 1
        value = value[0] if value else None
    return depth


# ----------------------------------------------------------- accepted subset
LITERAL = (
    "# HLBD data, Python style\n"
    "samples = [  # the list ] is not closed by this comment\n"
    "    {'concept': 'rain', 'level_1': {'emoji': '🌧️', u'字卡': r'雨'},\n"
    "     \"level_6\": {'中文': '下雨' '了。'},  # adjacent strings join\n"
    "     'level_5': {'英文': " + TQ + "It's ] raining\n" + TQ + "},\n"
    "     'level_4': {'拼音': '''xià ] yǔ'''}, 'n': (1, -2, +3, 0x1F, 0o17, 0b11, 1_000),\n"
    "     'f': [1.5, -1e3, .5, 2., 1E-2], 'k': [True, False, None], 't': (), 'one': (7),\n"
    "     'esc': '\\n\\t\\'\\\"\\\\ \\x41\\u4e2d\\U0001F327\\101\\0 \\N{BULLET} \\q \\\n"
    "end', 'raw': r'\\n\\'', (1, 'a'): {}, 2: [[], {},],\n"
    "    },\n"
    "]\n"
    "print(samples)\n"
)


def test_literal_subset_matches_python(tmp_path: Path) -> None:
    p = _write(tmp_path, "data.py", LITERAL)
    start = LITERAL.index("[")
    end = LITERAL.index("\nprint")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python warns about '\q'
        expected = ast.literal_eval(LITERAL[start:end])
    assert load_hlbd_samples(p) == expected
    (s,) = expected
    assert s["level_5"]["英文"] == "It's ] raining\n" and s["level_4"]["拼音"] == "xià ] yǔ"
    assert load_hlbd(p) == [("🌧️", "下雨了。"), ("It's ] raining", "下雨了。"), ("xià ] yǔ", "下雨了。")]


def test_random_literals_match_python(tmp_path: Path) -> None:
    rnd = random.Random(7)
    alphabet = "ab'\"\\\n\t]}[{#\x00中🌧é "

    def text() -> str:
        return "".join(rnd.choice(alphabet) for _ in range(rnd.randrange(6)))

    def sample() -> dict[str, Any]:
        return {
            "concept": text(),
            "level_6": {"中文": text()},
            "x": [rnd.randint(-(10**20), 10**20), rnd.random(), (text(), None), {1: True}],
        }

    samples = [sample() for _ in range(300)]
    body = "".join(f"  {s!r},  # {text()!r}\n" for s in samples)
    p = _write(tmp_path, "r.py", f"samples = [\n{body}]\n")
    assert load_hlbd_samples(p) == samples


def test_json_inside_text_keeps_json_meaning(tmp_path: Path) -> None:
    p = _write(tmp_path, "j.md", 'samples = [{"a": "x\\/y", "b": NaN, "c": true}]\n')
    (s,) = load_hlbd_samples(p)
    assert s["a"] == "x/y" and s["b"] != s["b"] and s["c"] is True
    # not JSON (trailing comma), so the literal parser reads JSON's true/false/null
    p2 = _write(tmp_path, "j2.md", 'samples = [{"c": true, "d": null, "e": false,},]\n')
    assert load_hlbd_samples(p2) == [{"c": True, "d": None, "e": False}]


def test_escaped_surrogate_pair_is_one_character(tmp_path: Path) -> None:
    p = _write(tmp_path, "s.py", "samples = [{'e': '\\ud83c\\udf27', 'lone': '\\ud800x',}]\n")
    (s,) = load_hlbd_samples(p)
    assert s["e"] == "🌧" and s["lone"] == "\ud800x"  # pairs join as in JSON; lone ones stay


# ------------------------------------------------------------ triple quotes
@pytest.mark.parametrize(
    "value",
    [
        "'''a\n] b'''",  # a newline: a quote-pair scanner ends the string early
        TQ + "a ] b\nc" + TQ,
        "'''it's ] here'''",  # quote inside
        TQ + 'say "]" ' + TQ,
    ],
)
def test_triple_quoted_string_with_bracket(tmp_path: Path, value: str) -> None:
    text = f"samples = [{{'concept': 'c', 'level_1': {{'emoji': {value}}}, 'level_6': {{'中文': '好'}}}}]\n"
    p = _write(tmp_path, "tq.py", text)
    expected = ast.literal_eval(value)
    assert load_hlbd(p) == [(expected.strip(), "好")]


# ------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "body,message",
    [
        ("[{oops}]", r"line 2, column 13, found 'oops'"),
        ("[1 2]", r"expected ',' or '\]' \(for '\[' at line 2, column 11\) at line 2, column 14, found '2'"),
        ("[1,,]", r"expected a value .* at line 2, column 14, found ','"),
        ("[{'a' 1}]", r"expected ':' after a dict key at line 2, column 17, found '1'"),
        ("[{[1]: 2}]", r"a list cannot be a dict key"),
        ("[b'x']", r"b'\.\.\.' string at line 2, column 12: only plain, r and u strings"),
        ("[f'{x}']", r"f'\.\.\.' string at line 2, column 12"),
        ("['\\x4']", r"invalid escape '\\\\x' in a string at line 2, column 13"),
        ("['\\N{NOPE}']", r"invalid escape '\\\\N\{NOPE\}'"),
        ("[01]", r"invalid number '01' at line 2, column 12"),
        ("[print(1)]", r"found 'print'"),
        ("[{1, 2}]", r"expected ':' after a dict key"),
        ("['abc]\n", r"unterminated string starting at line 2, column 12; a one-line string cannot span lines"),
        ("[" + TQ + "abc]\n", r"unterminated string starting at line 2, column 12$"),
        ('[{"a": "]"}\n', r"no matching closing bracket for '\[' at line 2, column 11 \(reached the end"),
    ],
)
def test_literal_errors_name_file_line_and_found(tmp_path: Path, body: str, message: str) -> None:
    p = _write(tmp_path, "bad.py", "# data\nsamples = " + body)
    with pytest.raises(ValueError, match=r"^.*bad\.py: 'samples = \[\.\.\.\]' at line 2, column 1 is not a JSON array or a Python literal.*" + message):
        load_hlbd(p)


# ------------------------------------------------------------------ nesting
def test_deep_literal_nesting_parses_up_to_the_limit(tmp_path: Path) -> None:
    n = 5000  # json (and ast) give up far earlier with a RecursionError
    p = _write(tmp_path, "deep.py", "samples = " + "[" * n + "]" * n + "\n")
    assert _depth(load_hlbd_samples(p)) == n
    p2 = _write(tmp_path, "deeper.py", "samples = " + "[" * 20_000 + "]" * 20_000 + "\n")
    with pytest.raises(ValueError, match=r"deeper\.py: .*nested deeper than 10000 levels at line 1, column 10011"):
        load_hlbd_samples(p2)


@pytest.mark.parametrize("name", ["deep.json", "deep.txt"])
def test_deep_json_nesting_is_a_named_error(tmp_path: Path, name: str) -> None:
    p = _write(tmp_path, name, "[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=name.replace(".", r"\.") + r": not valid JSON \(brackets nested too deeply"):
        load_hlbd_samples(p)


def test_huge_int_in_json_is_a_named_error(tmp_path: Path) -> None:
    p = _write(tmp_path, "big.json", "[" + "1" * 5000 + "]")
    with pytest.raises(ValueError, match=r"big\.json: not valid JSON"):
        load_hlbd_samples(p)


# ------------------------------------------------------------------- memory
def _peak_bytes(path: Path) -> tuple[int, int]:
    """(tracemalloc peak while loading ``path``, number of samples)."""
    tracemalloc.start()
    try:
        n = len(load_hlbd_samples(path))
        return tracemalloc.get_traced_memory()[1], n
    finally:
        tracemalloc.stop()


def test_literal_memory_is_close_to_json(tmp_path: Path) -> None:
    rnd = random.Random(3)
    han = [chr(c) for c in range(0x4E00, 0x4E00 + 2000)]

    def t(n: int) -> str:
        return "".join(rnd.choice(han) for _ in range(n))

    samples = [
        {"concept": f"c{i}", "level_1": {"emoji": "🌧️"}, "level_2": {"短语": t(3)}, "level_5": {"英文": f"it's sample {i}"}, "level_6": {"中文": t(15)}}
        for i in range(2500)
    ]
    p_json = _write(tmp_path, "d.json", json.dumps(samples, ensure_ascii=False, indent=1))
    p_lit = _write(tmp_path, "d.py", "samples = [\n" + "".join(f"    {s!r},\n" for s in samples) + "]\n")
    json_peak, n_json = _peak_bytes(p_json)
    lit_peak, n_lit = _peak_bytes(p_lit)
    assert n_json == n_lit == 2500
    size = p_lit.stat().st_size
    # measured ~1.1x the JSON peak and ~9x the file size; ast.literal_eval took ~13x and ~100x
    assert lit_peak < 3 * json_peak, (lit_peak, json_peak)
    assert lit_peak < 30 * size, (lit_peak, size)
