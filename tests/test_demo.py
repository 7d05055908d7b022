"""``hlbd-fast demo``: a tiny run end to end, and every bad input as one clear line, before any training."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from hlbd_fast import demo
from hlbd_fast.data import bundled_samples

TINY = dict(d_model=32, n_encoder_layers=1, n_decoder_layers=1, n_heads=4, d_ff=64, dropout=0.0)


@pytest.fixture
def small_hlbd(tmp_path):
    """An HLBD file with the first two bundled concepts (rain, love): 12 pairs, every test prompt among them."""
    path = tmp_path / "hlbd_small.json"
    path.write_text(json.dumps(list(bundled_samples())[:2], ensure_ascii=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- a tiny run
def test_run_demo_prints_table_and_generations_and_writes_histories(small_hlbd, tmp_path, capsys):
    out = tmp_path / "out"
    result = demo.run_demo(
        epochs=2,
        baseline_epochs=1,
        preset="fastest",
        data=str(small_hlbd),
        device="cpu",
        out=str(out),
        seed=0,
        model_overrides=TINY,
        progress=False,
    )
    text = capsys.readouterr().out

    # what it trained on and how
    assert "HLBD: 12 pairs" in text and "device cpu" in text
    assert "training 'baseline' for 1 epochs (micro-batch 4, accumulation 8)" in text
    assert "training 'fastest' for 2 epochs (micro-batch 32, accumulation 1)" in text

    # the table: a header and one row per run, with its epochs and final loss
    assert "| run | epochs | s/epoch | speedup | loss @ epoch 1 | final loss |" in text
    speed_table = text.split("| run | epochs |")[1].split("\n\n")[0]  # the speed table (the quality table follows)
    rows = {line.split("|")[1].strip(): line for line in speed_table.splitlines() if line.startswith(("| baseline", "| fastest"))}
    assert set(rows) == {"baseline", "fastest"}
    assert rows["baseline"].split("|")[2].strip() == "1"
    assert rows["fastest"].split("|")[2].strip() == "2"
    assert rows["fastest"].split("|")[6].strip() == f"{result['fastest']['losses'][-1]:.4f}"
    assert rows["baseline"].split("|")[4].strip() == "1.0x"  # the baseline against itself

    # the generations: every test prompt, with its expected answer from the data
    assert "generations (greedy):" in text
    gens = result["generations"]
    assert [g["prompt"] for g in gens] == list(demo.TEST_PROMPTS)
    assert gens[0]["expected"] == "下雨了，出门记得带伞。"
    assert all(g["expected"] == "我爱你，不管发生什么，我都会一直陪在你身边。" for g in gens[1:])
    for g in gens:
        assert repr(g["prompt"]) in text

    # the returned figures
    assert len(result["baseline"]["losses"]) == 1 and len(result["fastest"]["losses"]) == 2
    for name in ("baseline", "fastest"):
        assert all(math.isfinite(x) and 0 < x < 2 * math.log(5000) for x in result[name]["losses"])
        assert result[name]["s_per_epoch"] > 0 and result[name]["total_s"] > 0

    # --out: one history per run, matching what was returned, and the generations
    for name, epochs in (("baseline", 1), ("fastest", 2)):
        saved = json.loads((out / f"history_{name}.json").read_text(encoding="utf-8"))
        assert [e["epoch"] for e in saved["epochs"]] == list(range(1, epochs + 1))
        assert [e["loss"] for e in saved["epochs"]] == pytest.approx(result[name]["losses"], rel=1e-12)
    assert json.loads((out / "generations.json").read_text(encoding="utf-8")) == gens


def test_run_demo_baseline_preset_runs_once(small_hlbd, capsys):
    result = demo.run_demo(epochs=1, baseline_epochs=3, preset="baseline", data=str(small_hlbd), device="cpu", model_overrides=TINY, progress=False)
    assert set(result) == {"baseline", "generations"}
    assert len(result["baseline"]["losses"]) == 1  # --epochs, not --baseline-epochs, when the preset is the baseline
    assert capsys.readouterr().out.count("training '") == 1


# ---------------------------------------------------------------------------- bad inputs
def _bad(argv, capsys):
    status = demo.main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 2
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("hlbd-fast demo: error: ")
    assert captured.out == ""  # nothing was trained or printed before the error
    return lines[0]


def test_missing_data_file(tmp_path, capsys):
    line = _bad(["--data", str(tmp_path / "nope.json")], capsys)
    assert "--data" in line and "nope.json" in line and "no such file" in line
    assert line.count("nope.json") == 1


def test_data_file_without_samples(tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("just some notes, no samples here\n", encoding="utf-8")
    line = _bad(["--data", str(bad)], capsys)
    assert "--data" in line and "no HLBD samples found" in line
    assert line.count("notes.txt") == 1  # the path once, not once from --data and once from the reader


def test_data_file_that_is_not_json(tmp_path, capsys):
    bad = tmp_path / "broken.json"
    bad.write_text('[{"concept": ', encoding="utf-8")
    line = _bad(["--data", str(bad)], capsys)
    assert "not valid JSON" in line and "line 1" in line
    assert line == f"hlbd-fast demo: error: --data {str(bad)!r}: not valid JSON (Expecting value at line 1, column 14)"


def test_data_path_that_is_a_directory(tmp_path, capsys):
    line = _bad(["--data", str(tmp_path)], capsys)
    assert "directory" in line and line.count(str(tmp_path)) == 1


def test_data_path_written_another_way_is_named_once(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("no samples\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    line = _bad(["--data", "./notes.txt"], capsys)  # the reader names it 'notes.txt'
    assert line.startswith("hlbd-fast demo: error: --data './notes.txt': no HLBD samples found")
    assert line.count("notes.txt") == 1


def test_data_sample_errors_name_the_path_once(tmp_path, capsys):
    bad = tmp_path / "odd.json"
    bad.write_text(json.dumps([{"concept": "rain", "level_1": "not an object"}]), encoding="utf-8")
    line = _bad(["--data", str(bad)], capsys)
    assert line.startswith(f"hlbd-fast demo: error: --data {str(bad)!r}: sample 0")
    assert line.count("odd.json") == 1


@pytest.mark.parametrize(
    "device, words",
    [
        ("tpu-nonsense", "is not a device name"),
        ("meta", "only cpu and cuda are supported"),
    ],
)
def test_bad_device(device, words, capsys):
    line = _bad(["--device", device], capsys)
    assert f"--device {device}" in line.replace("'", "") and words in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(capsys):
    line = _bad(["--device", "cuda"], capsys)
    assert "CUDA is not available" in line and "--device cpu" in line


def test_unknown_preset(capsys):
    line = _bad(["--preset", "turbo"], capsys)
    assert "--preset 'turbo' is unknown; choose one of baseline, extreme, fastest, quick" in line


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--baseline-epochs", "-1"]])
def test_bad_epochs(argv, capsys):
    line = _bad(argv, capsys)
    assert "--epochs must be >= 1 and --baseline-epochs >= 0" in line


def test_non_integer_epochs_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--epochs", "ten"])
    assert e.value.code == 2
    assert "--epochs: invalid int value: 'ten'" in capsys.readouterr().err


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if the demo reads its data or builds a trainer."""

    def refuse(*args, **kwargs):
        raise AssertionError("the demo started work although an output path cannot be written")

    monkeypatch.setattr(demo, "load_hlbd", refuse)
    monkeypatch.setattr(demo.FastTrainer, "from_preset", refuse)


def _unwritable_out(tmp_path, kind):
    """An ``--out`` directory that cannot be used, of the given kind."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    if kind == "under a file":
        return blocker / "results"
    if kind == "an existing file":
        return blocker
    out = tmp_path / "results"  # the directory is fine, but a file the demo writes there is a directory
    (out / "generations.json").mkdir(parents=True)
    return out


@pytest.mark.parametrize("kind", ["under a file", "an existing file", "a file it writes is a directory"])
def test_unwritable_out_is_refused_before_any_work(kind, small_hlbd, tmp_path, capsys, no_training):
    out = _unwritable_out(tmp_path, kind)
    line = _bad(["--out", str(out), "--data", str(small_hlbd), "--device", "cpu", "--epochs", "1", "--baseline-epochs", "0", "--no-progress"], capsys)
    assert line.startswith("hlbd-fast demo: error: --out ") and str(out) in line
    assert (tmp_path / "a-file").read_text(encoding="utf-8") == "not a folder"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_is_refused_before_any_work(tmp_path, capsys, no_training):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = _bad(["--out", str(locked / "results"), "--device", "cpu"], capsys)
    finally:
        locked.chmod(0o700)
    assert "--out" in line and "cannot be written" in line


def test_out_path_that_is_a_file(small_hlbd, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("", encoding="utf-8")
    with pytest.raises(demo.DemoError, match="--out"):
        demo.run_demo(epochs=1, baseline_epochs=0, data=str(small_hlbd), device="cpu", out=str(taken), model_overrides=TINY, progress=False)


def test_run_demo_shows_what_each_run_learned_and_the_learning_phase(small_hlbd, tmp_path, capsys):
    """Quality side by side after the same epochs; then the fast preset to convergence, with exact match."""
    out = tmp_path / "out"
    result = demo.run_demo(
        epochs=3, baseline_epochs=1, data=str(small_hlbd), device="cpu", out=str(out), model_overrides=TINY, progress=False, learn_epochs=60, learn_lr=1e-2
    )
    text = capsys.readouterr().out
    assert "| run | after epochs | eval loss | token accuracy | exact match |" in text
    base, fast = result["baseline"], result["fastest"]
    assert base["quality_epoch"] == fast["quality_epoch"] == 1  # side by side: the same number of epochs
    assert fast["quality"]["loss"] == pytest.approx(base["quality"]["loss"], rel=0.05)  # the same start, the same data
    learn = result["learn"]
    assert "learning: 'fastest' for 60 epochs at lr 0.01" in text and "exact match" in text
    assert learn["quality"]["exact_match"] >= 0.5 and learn["losses"][-1] < 0.5 * learn["losses"][0]  # it learned
    saved = json.loads((out / "quality.json").read_text(encoding="utf-8"))
    assert set(saved) == {"baseline", "fastest", "learn"} and saved["learn"]["after_epochs"] == 60


def test_holdout_keeps_pairs_out_of_training(small_hlbd, capsys):
    result = demo.run_demo(epochs=1, baseline_epochs=1, data=str(small_hlbd), device="cpu", model_overrides=TINY, progress=False, holdout=0.25)
    text = capsys.readouterr().out
    assert "HLBD: 12 pairs, 3 held out for evaluation" in text and "evaluated on 3 held-out pairs" in text
    assert result["baseline"]["quality"]["samples"] == 3


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"holdout": 1.0}, "--holdout 1.0"),
        ({"holdout": -0.1}, "--holdout -0.1"),
        ({"learn_epochs": -1}, "--learn-epochs -1"),
        ({"learn_lr": 0.0}, "--learn-lr 0.0"),
    ],
)
def test_bad_quality_options_are_refused_before_any_work(small_hlbd, kw, match):
    with pytest.raises(demo.DemoError, match=match):
        demo.run_demo(epochs=1, baseline_epochs=1, data=str(small_hlbd), device="cpu", model_overrides=TINY, **kw)
