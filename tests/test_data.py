"""Tests for hlbd_fast.data: HLBD reader, bundled sample, tokenizer, datasets."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from hlbd_fast.data import (
    BOS_ID,
    DEFAULT_LEVELS,
    EOS_ID,
    PAD_ID,
    TARGET_LEVEL,
    UNK_ID,
    CharTokenizer,
    PairDataset,
    bundled_samples,
    encode_pairs,
    load_hlbd,
    load_hlbd_samples,
    samples_to_pairs,
    save_bundled_hlbd,
)


def _sample(concept: str = "rain", **overrides: object) -> dict:
    s = {
        "concept": concept,
        "level_1": {"字卡": "雨", "emoji": "🌧️"},
        "level_2": {"短语": "下雨"},
        "level_3": {"数学": "1+1=2"},
        "level_4": {"拼音": "xià yǔ"},
        "level_5": {"英文": "It is raining"},
        "level_6": {"中文": "下雨了。"},
        "level_7": {"日文": "雨が降る"},
        "level_8": {"韩文": "비가 와요"},
    }
    s.update(overrides)
    return s


RAIN_PAIRS = [
    ("🌧️", "下雨了。"),
    ("下雨", "下雨了。"),
    ("It is raining", "下雨了。"),
    ("xià yǔ", "下雨了。"),
    ("雨が降る", "下雨了。"),
    ("비가 와요", "下雨了。"),
]


# ----------------------------------------------------------------- bundled
def test_bundled_has_600_pairs_in_fixed_order() -> None:
    pairs = load_hlbd()
    assert len(pairs) == 600
    assert pairs == load_hlbd()
    assert all(isinstance(s, str) and s and isinstance(t, str) and t for s, t in pairs)
    # 6 pairs per concept, in DEFAULT_LEVELS order, all with the same target
    assert [s for s, _ in pairs[:6]] == ["🌧️", "下雨", "It is raining", "xià yǔ", "雨が降っている", "비가 와요"]
    targets = [t for _, t in pairs]
    for i in range(0, 600, 6):
        assert len(set(targets[i : i + 6])) == 1
    assert len(set(targets)) == 100
    assert len({s for s, _ in pairs[0::6]}) == 100  # distinct emoji
    assert all(5 <= len(t) <= 30 for t in targets)
    assert max(len(s) for s, _ in pairs) <= 64


def test_bundled_contains_seed_prompts() -> None:
    pairs = load_hlbd()
    by_src = dict(pairs)
    assert "下雨" in by_src["🌧️"]
    love = by_src["❤️"]
    assert "我爱你" in love
    for prompt in ("我爱你", "I love you", "愛してる", "사랑해"):
        assert by_src[prompt] == love


def test_bundled_vocab_fits_5000() -> None:
    tok = CharTokenizer.from_pairs(load_hlbd(), vocab_size=5000)
    assert tok.num_chars + 4 <= 5000


def test_bundled_samples_are_copies_and_roundtrip(tmp_path: Path) -> None:
    a = bundled_samples()
    a[0]["level_6"]["中文"] = "changed"
    assert bundled_samples()[0]["level_6"]["中文"] != "changed"
    assert len(load_hlbd_samples()) == 100
    path = save_bundled_hlbd(tmp_path / "hlbd.json")
    assert "下雨" in path.read_text(encoding="utf-8")  # ensure_ascii=False
    assert load_hlbd(path) == load_hlbd()


# ------------------------------------------------------------------ reader
def test_json_list_and_object(tmp_path: Path) -> None:
    p1 = tmp_path / "a.json"
    p1.write_text(json.dumps([_sample()], ensure_ascii=False), encoding="utf-8")
    p2 = tmp_path / "b.json"
    p2.write_text(json.dumps({"samples": [_sample()], "meta": 1}), encoding="utf-8")
    assert load_hlbd(p1) == RAIN_PAIRS
    assert load_hlbd(str(p2)) == RAIN_PAIRS


def test_samples_assignment_in_prose(tmp_path: Path) -> None:
    tricky = _sample("tricky", level_5={"英文": 'a "quoted" ] bracket [ and }'})
    body = json.dumps([_sample(), tricky], ensure_ascii=False, indent=2)
    text = (
        "# HLBD notes\n\nSome prose mentioning brackets ] [ and the word samples.\n\n"
        "```python\nimport json\nsamples = " + body + "\nprint(len(samples))\n```\n"
        "More prose after: [not part of it]\n"
    )
    p = tmp_path / "notes.md"
    p.write_text(text, encoding="utf-8")
    pairs = load_hlbd(p)
    assert pairs[:6] == RAIN_PAIRS
    assert ('a "quoted" ] bracket [ and }', "下雨了。") in pairs
    assert len(pairs) == 12


def test_samples_key_in_prose(tmp_path: Path) -> None:
    p = tmp_path / "doc.md"
    p.write_text("Example:\n```json\n" + json.dumps({"samples": [_sample()]}) + "\n```\n", encoding="utf-8")
    assert load_hlbd(p) == RAIN_PAIRS


def test_python_literal_with_trailing_commas(tmp_path: Path) -> None:
    p = tmp_path / "data.py"
    p.write_text(
        "samples: list = []  # filled below\n"
        "samples = [\n"
        "    {'concept': 'x', 'level_1': {'emoji': '🌧️'},  # a comment ]\n"
        "     'level_6': {'中文': '下雨了。'},},\n"
        "]\n",
        encoding="utf-8",
    )
    assert load_hlbd(p) == [("🌧️", "下雨了。")]


def test_quirks_unwrap_missing_extra_empty(tmp_path: Path) -> None:
    samples = [
        _sample(
            level_2={"短语": {"短语": {"短语": "  下雨  "}}},  # nested same key, spaces
            level_5={"英文": "", "note": 3},  # empty text skipped, extra key ignored
            extra_field={"anything": [1, 2]},
        ),
        {"concept": "no target", "level_1": {"emoji": "☀️"}},  # no 中文 -> nothing
        {"concept": "partial", "level_6": {"中文": "你好。"}, "level_8": {"韩文": "안녕"}},
        _sample(level_7=None, level_4={"拼音": None}),
    ]
    pairs = samples_to_pairs(samples)
    assert pairs[:5] == [RAIN_PAIRS[0], ("下雨", "下雨了。"), *RAIN_PAIRS[3:]]
    assert pairs[5] == ("안녕", "你好。")
    assert pairs[6:] == [RAIN_PAIRS[i] for i in (0, 1, 2, 5)]
    p = tmp_path / "q.json"
    p.write_text(json.dumps(samples), encoding="utf-8")
    assert load_hlbd(p) == pairs


def test_custom_levels_and_target() -> None:
    pairs = samples_to_pairs([_sample()], levels=[("level_1", "字卡"), ("level_3", "数学")])
    assert pairs == [("雨", "下雨了。"), ("1+1=2", "下雨了。")]
    pairs = samples_to_pairs([_sample()], levels=[("level_6", "中文")], target=("level_5", "英文"))
    assert pairs == [("下雨了。", "It is raining")]
    assert DEFAULT_LEVELS[0] == ("level_1", "emoji") and TARGET_LEVEL == ("level_6", "中文")
    with pytest.raises(ValueError, match="levels"):
        samples_to_pairs([_sample()], levels="level_1")
    with pytest.raises(ValueError, match="levels"):
        samples_to_pairs([_sample()], levels=[("level_1",)])


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_hlbd(missing)


def test_file_without_samples(tmp_path: Path) -> None:
    p = tmp_path / "prose.md"
    p.write_text("Just prose, no data here.\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"prose\.md.*looked for.*samples = \[") as e:
        load_hlbd(p)
    assert "'samples'" in str(e.value)
    p2 = tmp_path / "obj.json"
    p2.write_text('{"data": []}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"obj\.json.*looked for"):
        load_hlbd(p2)
    p3 = tmp_path / "empty.json"
    p3.write_text("[]", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.json.*empty"):
        load_hlbd(p3)


def test_invalid_json(tmp_path: Path) -> None:
    p = tmp_path / "bad.json"
    p.write_text('[{"concept": "x",,}]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json.*not valid JSON.*line 1"):
        load_hlbd(p)
    p1 = tmp_path / "bad.txt"
    p1.write_text('\n[{"concept": "x"}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.txt.*not valid JSON.*line 2"):
        load_hlbd(p1)
    p2 = tmp_path / "bad.md"
    p2.write_text("text\nsamples = [{oops}]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.md.*not a JSON array"):
        load_hlbd(p2)
    p3 = tmp_path / "open.md"
    p3.write_text('samples = [{"a": "]"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"open\.md.*no matching closing bracket"):
        load_hlbd(p3)


def test_sample_not_an_object(tmp_path: Path) -> None:
    p = tmp_path / "s.json"
    p.write_text(json.dumps([_sample(), "just a string"]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"s\.json: sample 1 must be an object"):
        load_hlbd(p)


@pytest.mark.parametrize(
    "level,bad,key",
    [
        ("level_5", {"英文": 42}, r"level_5\.英文 must be text, got int"),
        ("level_5", {"英文": ["a", "b"]}, r"level_5\.英文 must be text, got list"),
        ("level_6", {"中文": True}, r"level_6\.中文 must be text, got bool"),
        ("level_2", {"短语": {"other": "x"}}, r"level_2\.短语 is an object without"),
        ("level_4", "xià yǔ", r"'level_4' must be an object"),
    ],
)
def test_bad_level_values(tmp_path: Path, level: str, bad: object, key: str) -> None:
    p = tmp_path / "lv.json"
    p.write_text(json.dumps([_sample(), _sample("x", **{level: bad})]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"lv\.json: sample 1 \(concept 'x'\): " + key):
        load_hlbd(p)


def test_no_usable_pairs(tmp_path: Path) -> None:
    p = tmp_path / "nt.json"
    p.write_text(json.dumps([{"level_1": {"emoji": "☀️"}}]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"nt\.json.*no \(source, target\) pair"):
        load_hlbd(p)


# --------------------------------------------------------------- tokenizer
def test_tokenizer_build_is_deterministic_and_frozen() -> None:
    a = CharTokenizer.from_texts(["cab", "b"])
    b = CharTokenizer.from_texts(["b", "abc"])
    assert a == b and a.chars == ("a", "b", "c")
    assert a.vocab_size == 7 and len(a) == 7
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert a.encode("abc", max_length=5) == [4, 5, 6, 0, 0]
    assert a.is_frozen is True
    with pytest.warns(UserWarning, match="not in the vocabulary"):
        assert a.encode("axz", max_length=3) == [4, UNK_ID, UNK_ID]
    assert a.unknown_count == 2
    assert a.vocab_size == 7 and a.chars == ("a", "b", "c")  # never grows
    big = CharTokenizer.from_texts(["abc"], vocab_size=5000)
    assert big.vocab_size == 5000 and big.encode("c", 2) == [6, 0]


def test_tokenizer_bad_input() -> None:
    with pytest.raises(ValueError, match="texts is empty"):
        CharTokenizer.from_texts([])
    with pytest.raises(ValueError, match="single string"):
        CharTokenizer.from_texts("abc")
    with pytest.raises(ValueError, match="no characters"):
        CharTokenizer.from_texts(["", ""])
    with pytest.raises(ValueError, match=r"texts\[1\] is a int"):
        CharTokenizer.from_texts(["a", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"vocab_size=5 is too small.*3 distinct characters.*need 7"):
        CharTokenizer.from_texts(["abc"], vocab_size=5)


def test_encode_special_tokens_and_truncation() -> None:
    tok = CharTokenizer.from_texts(["abcdef"])
    a, b, c = 4, 5, 6
    assert tok.encode("abc", 6, add_special_tokens=True) == [BOS_ID, a, b, c, EOS_ID, PAD_ID]
    assert tok.encode("abc", 4, add_eos=True) == [a, b, c, EOS_ID]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert tok.encode("abcdef", 4) == [a, b, c, 7]
        # truncation keeps BOS and EOS
        assert tok.encode("abcdef", 4, add_special_tokens=True) == [BOS_ID, a, b, EOS_ID]
        tok.encode_batch(["abcdef"] * 5, 2)
    trunc = [w for w in rec if "truncated" in str(w.message)]
    assert len(trunc) == 1, "truncation is reported once per tokenizer"
    assert "max_length=4" in str(trunc[0].message)
    assert tok.truncated_count == 7
    with pytest.raises(ValueError, match="max_length=2 is too small"):
        tok.encode("a", 2, add_special_tokens=True)
    with pytest.raises(ValueError, match="text must be a str"):
        tok.encode(5)  # type: ignore[arg-type]


def test_encode_batch_and_decode() -> None:
    tok = CharTokenizer.from_texts(["你好 world"])
    batch = tok.encode_batch(["你好", "world"], max_length=8, add_special_tokens=True)
    assert batch.dtype == torch.long and batch.shape == (2, 8)
    assert tok.decode(batch[0]) == "你好"
    assert tok.decode(batch[1].tolist()) == "world"
    assert tok.decode_batch(batch) == ["你好", "world"]
    # stops at EOS, skips PAD/BOS, reserved ids and UNK render as U+FFFD
    ids = [BOS_ID, PAD_ID] + tok.encode("好", 1) + [UNK_ID, EOS_ID] + tok.encode("你", 1)
    assert tok.decode(ids) == "好\ufffd"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(batch)


def test_tokenizer_save_load_pickle(tmp_path: Path) -> None:
    tok = CharTokenizer.from_pairs(load_hlbd(), vocab_size=5000)
    path = tok.save(tmp_path / "tok.json")
    raw = path.read_text(encoding="utf-8")
    assert "雨" in raw and "\\u" not in raw
    loaded = CharTokenizer.load(path)
    assert loaded == tok and loaded.vocab_size == 5000
    text = "我爱你 I love you 사랑해"
    assert loaded.encode(text) == tok.encode(text)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone == tok and clone.encode(text) == tok.encode(text) and clone.is_frozen
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CharTokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"chars": "ab"}', encoding="utf-8")
    with pytest.raises(ValueError, match="not a saved CharTokenizer"):
        CharTokenizer.load(bad)


def test_tokenizer_refuses_lone_surrogates(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"texts\[1\] 'a\\ud800b' holds a lone UTF-16 surrogate '\\ud800' \(U\+D800\)"):
        CharTokenizer.from_texts(["ok", "a\ud800b"])
    with pytest.raises(ValueError, match=r"CharTokenizer chars holds a lone UTF-16 surrogate '\\udfff'"):
        CharTokenizer(["a", "\udfff"])
    # a saved file with a JSON escape for half a pair (JSON accepts it) is refused, naming the file
    p = tmp_path / "sur.json"
    p.write_text(json.dumps({**CharTokenizer(["a"]).to_dict(), "chars": "a\ud800"}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"sur\.json: CharTokenizer chars holds a lone UTF-16 surrogate"):
        CharTokenizer.load(p)
    # a whole escaped pair is one character and loads
    p.write_text(json.dumps({**CharTokenizer(["a", "b"]).to_dict(), "chars": "a\U0001f327"}), encoding="utf-8")
    assert CharTokenizer.load(p).chars == ("a", "\U0001f327")


def _dir_listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_tokenizer_failed_save_keeps_existing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = CharTokenizer.from_texts(["abc"]).save(tmp_path / "tok.json")
    before = path.read_bytes()
    # a vocabulary that cannot be encoded (only reachable around the construction checks,
    # e.g. a tokenizer unpickled from an old version): refused before the file is opened
    broken = CharTokenizer.from_texts(["xy"])
    broken._chars = ("x", "\ud800")
    with pytest.raises(ValueError, match=r"cannot save the tokenizer to .*tok\.json: .*surrogate '\\ud800'.*was not touched"):
        broken.save(path)
    assert path.read_bytes() == before and _dir_listing(tmp_path) == ["tok.json"]

    # a failure while writing (disk full, ...) leaves the old file and no temporary
    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("hlbd_fast._io.os.fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        CharTokenizer.from_texts(["xyz"]).save(path)
    assert path.read_bytes() == before and _dir_listing(tmp_path) == ["tok.json"]
    monkeypatch.undo()
    new = CharTokenizer.from_texts(["xyz"])
    assert CharTokenizer.load(new.save(path)) == new and _dir_listing(tmp_path) == ["tok.json"]


# ----------------------------------------------------------------- datasets
PAIRS8 = [("a", "甲"), ("bb", "乙乙"), ("ccc", "丙"), ("d", "丁丁丁"), ("e", "戊"), ("ff", "己"), ("g", "庚"), ("hh", "辛辛")]


def test_encode_pairs_format() -> None:
    tok = CharTokenizer.from_pairs(PAIRS8)
    src, tgt = encode_pairs(PAIRS8, tok, max_length=6)
    assert src.shape == tgt.shape == (8, 6) and src.dtype == tgt.dtype == torch.long
    assert src[1].tolist() == tok.encode("bb", 6)  # sources: text only
    assert tgt[1].tolist() == [BOS_ID, *tok.encode("乙乙", 2), EOS_ID, PAD_ID, PAD_ID]
    src_e, _ = encode_pairs(PAIRS8, tok, max_length=6, src_eos=True)
    assert src_e[1].tolist()[:3] == [*tok.encode("bb", 2), EOS_ID]
    _, tgt_plain = encode_pairs(PAIRS8, tok, max_length=6, add_special_tokens=False)
    assert tgt_plain[1].tolist() == tok.encode("乙乙", 6)
    assert all(tok.decode(row) == t for row, (_, t) in zip(tgt, PAIRS8))


def test_pair_dataset_and_errors() -> None:
    tok = CharTokenizer.from_pairs(PAIRS8)
    ds = PairDataset(PAIRS8, tok, max_length=6)
    src, tgt = encode_pairs(PAIRS8, tok, max_length=6)
    assert len(ds) == 8
    s, t = ds[3]
    assert s.shape == t.shape == (6,) and torch.equal(s, src[3]) and torch.equal(t, tgt[3])
    assert torch.equal(ds.tensors[0], src)
    assert ds.tokenizer is tok and ds.tokenizer.is_frozen
    with pytest.raises(ValueError, match="pairs is empty"):
        PairDataset([], tok)
    with pytest.raises(ValueError, match=r"pairs\[1\] must be a \(source, target\) pair"):
        PairDataset([("a", "b"), ("a",)], tok)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="two strings"):
        encode_pairs([("a", 1)], tok)  # type: ignore[list-item]

    class Growing:
        is_frozen = False

    with pytest.raises(ValueError, match="frozen"):
        encode_pairs(PAIRS8, Growing())  # type: ignore[arg-type]


def test_dataloader_workers_match_single_process() -> None:
    pairs = load_hlbd()[:96]
    tok = CharTokenizer.from_pairs(pairs, vocab_size=5000)
    ds = PairDataset(pairs, tok, max_length=64)

    def batches(workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(1234)
        loader = DataLoader(ds, batch_size=16, shuffle=True, generator=g, num_workers=workers)
        return list(loader)

    single = batches(0)
    multi = batches(2)
    assert len(single) == len(multi) == 6
    for (s0, t0), (s1, t1) in zip(single, multi):
        assert torch.equal(s0, s1) and torch.equal(t0, t1)
    # and the batches decode to the original text pairs
    text_pairs = set(pairs)
    for s, t in multi:
        for srow, trow in zip(s, t):
            assert (tok.decode(srow), tok.decode(trow)) in text_pairs
