"""CSVLogger and TensorBoardLogger: what they write, that they add no host sync, and the files after an error or a resume."""

from __future__ import annotations

import csv
import sys
import textwrap

import pytest
import torch
from conftest import TinySeq2Seq, ragged_pairs

from hlbd_fast import DeferredLossSync, FastTrainer, Strategy
from hlbd_fast.strategies.base import Distribution
from hlbd_fast.strategies.loggers import CSV_COLUMNS, CSVLogger, TensorBoardLogger

DATA = ragged_pairs(n=16)
VAL = ragged_pairs(n=6, seed=3)
EVAL_COLUMNS = ["eval_loss", "eval_token_accuracy", "eval_exact_match", "eval_tokens", "eval_samples"]


def distinct(seen):
    """The reads a logger writes: a repeat of the read before (same step and figures) adds no row."""
    return [r for i, r in enumerate(seen) if i == 0 or r != seen[i - 1]]


def make(*strategies):
    torch.manual_seed(0)
    return FastTrainer(TinySeq2Seq(), strategies=list(strategies), progress=False, seed=0, lr=1e-2)


def rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


class Reads(Strategy):
    """Records (epoch, step, loss, tokens) of every read-back."""

    def __init__(self):
        self.seen = []

    def on_loss_read(self, trainer, figures):
        self.seen.append((trainer.epoch + 1, trainer.global_step, figures.loss, int(figures.tokens)))


class FailAt(Strategy):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer):
        if trainer.global_step == self.step:
            raise RuntimeError("boom")


# ---------------------------------------------------------------------------- CSVLogger
def test_csv_has_a_row_per_read_and_per_epoch_equal_to_the_history(tmp_path):
    path = tmp_path / "log.csv"
    reads = Reads()
    t = make(DeferredLossSync(every=1), reads, CSVLogger(path))
    h = t.fit(DATA, 2, batch_size=4, eval_data=VAL, eval_every=2)
    header, got = rows(path)
    assert header == list(CSV_COLUMNS) + EVAL_COLUMNS
    read_rows = [r for r in got if r["kind"] == "read"]
    assert t.loss_reads == len(reads.seen) == 2 * (4 + 1)  # every step, and each epoch's end
    assert len(read_rows) == 2 * 4  # the read closing an epoch repeats its last step's: no row
    assert [(int(r["epoch"]), int(r["step"]), float(r["loss"]), int(r["tokens"])) for r in read_rows] == distinct(reads.seen)
    epochs = [r for r in got if r["kind"] == "epoch"]
    assert [r["kind"] for r in got] == (["read"] * 4 + ["epoch"]) * 2
    for row, record in zip(epochs, h.records, strict=True):
        assert int(row["epoch"]) == record.epoch and int(row["tokens"]) == record.tokens
        assert float(row["loss"]) == record.loss and float(row["lr"]) == record.lr
        assert float(row["seconds"]) == record.seconds and float(row["tokens_per_second"]) == record.tokens_per_second
    assert int(epochs[1]["step"]) == t.global_step == 8
    assert all(epochs[0][c] == "" for c in EVAL_COLUMNS)  # no evaluation after epoch 1 (eval_every=2)
    for name, value in h[1].eval.items():
        assert float(epochs[1][f"eval_{name}"]) == value
    assert epochs[1]["eval_exact_match"] == ""


def test_the_loggers_add_no_host_sync(tmp_path):
    plain = make(DeferredLossSync(every=3))
    plain.fit(DATA, 2, batch_size=4, eval_data=VAL)
    logged = make(DeferredLossSync(every=3), CSVLogger(tmp_path / "log.csv"))
    logged.fit(DATA, 2, batch_size=4, eval_data=VAL)
    assert logged.loss_reads == plain.loss_reads
    assert len([r for r in rows(tmp_path / "log.csv")[1] if r["kind"] == "read"]) == plain.loss_reads


def test_the_file_holds_every_row_logged_before_an_error(tmp_path):
    path = tmp_path / "log.csv"
    reads = Reads()
    t = make(DeferredLossSync(every=1), reads, CSVLogger(path), FailAt(6))
    with pytest.raises(RuntimeError, match="boom"):
        t.fit(DATA, 3, batch_size=4, eval_data=VAL)
    header, got = rows(path)
    assert header == list(CSV_COLUMNS) + EVAL_COLUMNS
    assert [r["kind"] for r in got] == ["read"] * 4 + ["epoch"] + ["read"] * 1  # steps 1-4, epoch 1's end; step 5
    assert [int(r["step"]) for r in got if r["kind"] == "read"] == [s for _, s, _, _ in distinct(reads.seen)]
    assert float(got[4]["eval_loss"]) == t.history[0].eval["loss"]


def test_a_resumed_run_continues_the_file_without_the_rows_of_the_interrupted_one(tmp_path):
    straight = tmp_path / "straight.csv"
    make(DeferredLossSync(every=1), CSVLogger(straight)).fit(DATA, 3, batch_size=4, eval_data=VAL)

    path, ckpt = tmp_path / "log.csv", tmp_path / "ckpt"
    make(DeferredLossSync(every=1), CSVLogger(path)).fit(DATA, 1, batch_size=4, eval_data=VAL, checkpoint_dir=ckpt)
    crashed = make(DeferredLossSync(every=1), CSVLogger(path), FailAt(7))  # logs 3 steps past the checkpoint, then fails
    crashed.load(ckpt / "last.pt")
    with pytest.raises(RuntimeError, match="boom"):
        crashed.fit(DATA, 3, batch_size=4, eval_data=VAL)
    assert max(int(r["step"]) for r in rows(path)[1]) == 6  # steps 5 and 6 read, then step 7 failed
    make(DeferredLossSync(every=1), CSVLogger(path)).fit(DATA, 3, batch_size=4, eval_data=VAL, checkpoint_dir=ckpt, resume=True)

    def comparable(p):
        header, got = rows(p)
        return header, [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_second")} for r in got]

    assert comparable(path) == comparable(straight)


def test_a_fresh_run_replaces_an_old_file(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("old,columns\n1,2\n")
    make(CSVLogger(path)).fit(DATA, 1, batch_size=4)
    header, got = rows(path)
    assert header == list(CSV_COLUMNS) + EVAL_COLUMNS
    assert [r["kind"] for r in got] == ["read", "epoch"]


def test_a_metric_outside_evaluates_adds_a_column_and_keeps_the_rows(tmp_path):
    class Bleu(Strategy):
        def on_epoch_end(self, trainer, record):
            if record.epoch == 2:
                record.eval = {**(record.eval or {}), "bleu": 0.25}

    path = tmp_path / "log.csv"
    make(Bleu(), CSVLogger(path)).fit(DATA, 2, batch_size=4, eval_data=VAL)
    header, got = rows(path)
    assert header == list(CSV_COLUMNS) + EVAL_COLUMNS + ["eval_bleu"]
    assert [r["kind"] for r in got] == ["read", "epoch"] * 2
    assert got[1]["eval_bleu"] == "" and float(got[3]["eval_bleu"]) == 0.25
    assert got[1]["eval_loss"] != ""


def test_only_the_main_process_writes(tmp_path):
    class SecondRank(Distribution):
        @property
        def rank(self):
            return 1

    path = tmp_path / "log.csv"
    t = make(SecondRank(), CSVLogger(path))
    t.fit(DATA, 1, batch_size=4)
    assert not path.exists()


def test_csv_bad_paths(tmp_path):
    with pytest.raises(TypeError, match=r"CSVLogger\(path=3\): path must be a file path"):
        CSVLogger(3)
    with pytest.raises(ValueError, match="is a directory; give a file name"):
        CSVLogger(tmp_path)


# ---------------------------------------------------------------------------- TensorBoardLogger
def test_without_tensorboard_the_logger_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard.writer", raising=False)
    with pytest.raises(ImportError, match=r"pip install hlbd-fast\[tensorboard\]"):
        TensorBoardLogger(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()


def test_tensorboard_writes_an_event_file(tmp_path):
    pytest.importorskip("tensorboard")
    log_dir = tmp_path / "tb"
    t = make(DeferredLossSync(every=1), TensorBoardLogger(log_dir))
    t.fit(DATA, 2, batch_size=4, eval_data=VAL)
    events = list(log_dir.glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "epoch/loss", "epoch/lr", "eval/loss", "eval/token_accuracy"} <= tags
    assert [e.value for e in acc.Scalars("epoch/loss")] == pytest.approx(t.history.losses)
    assert t.loss_reads == 10 and [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))  # epoch-closing repeats left out


def test_tensorboard_bad_log_dir():
    with pytest.raises(TypeError, match=r"TensorBoardLogger\(log_dir=None\): log_dir must be a directory path"):
        TensorBoardLogger(None)


def example(cls):
    return textwrap.dedent(cls.__doc__.split("Example::\n", 1)[1].split("\n    Args:", 1)[0])


def test_the_csv_docstring_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(example(CSVLogger), "CSVLogger example", "exec"), {})
    assert len(rows(tmp_path / "runs" / "log.csv")[1]) == 4  # 2 steps an epoch, read at the second: 1 read + 1 epoch row, twice


def test_the_tensorboard_docstring_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.chdir(tmp_path)
    exec(compile(example(TensorBoardLogger), "TensorBoardLogger example", "exec"), {})
    assert list((tmp_path / "runs" / "exp1").glob("events.out.tfevents.*"))


def test_tensorboard_a_resumed_run_purges_the_events_of_the_interrupted_one(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir, ckpt = tmp_path / "tb", tmp_path / "ckpt"
    make(DeferredLossSync(every=1), TensorBoardLogger(log_dir)).fit(DATA, 1, batch_size=4, checkpoint_dir=ckpt)
    crashed = make(DeferredLossSync(every=1), TensorBoardLogger(log_dir), FailAt(7))
    crashed.load(ckpt / "last.pt")
    with pytest.raises(RuntimeError, match="boom"):
        crashed.fit(DATA, 3, batch_size=4)
    resumed = make(DeferredLossSync(every=1), TensorBoardLogger(log_dir))
    resumed.fit(DATA, 3, batch_size=4, checkpoint_dir=ckpt, resume=True)
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(1, 13))  # one read per step; the epoch's closing read repeats its last step's
    assert [e.value for e in acc.Scalars("epoch/loss")] == pytest.approx(resumed.history.losses)


# ---------------------------------------------------------------------------- a mid-epoch stop, then a resume
class StopAt(Strategy):
    """Requests a stop after optimizer step ``step`` (mid-epoch: 4 steps an epoch here)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer):
        if trainer.global_step == self.step:
            trainer.request_stop()


def comparable(path):
    header, got = rows(path)
    return header, [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_second")} for r in got]


def test_a_mid_epoch_stop_and_resume_logs_no_repeated_and_no_cut_row(tmp_path):
    """The stop's own reads (closing the epoch, checking the checkpoint) and a line cut by a kill leave nothing behind."""
    straight = tmp_path / "straight.csv"
    make(DeferredLossSync(every=1), CSVLogger(straight)).fit(DATA, 3, batch_size=4, eval_data=VAL)
    path, ckpt = tmp_path / "log.csv", tmp_path / "ckpt"
    make(DeferredLossSync(every=1), CSVLogger(path), StopAt(6)).fit(DATA, 3, batch_size=4, eval_data=VAL, checkpoint_dir=ckpt)
    assert [int(r["step"]) for r in rows(path)[1] if r["kind"] == "read"] == [1, 2, 3, 4, 5, 6]
    with open(path, "a", encoding="utf-8", newline="") as f:
        f.write("read,2,")  # a row a kill cut short (its step lost: it would read as step 0)
    make(DeferredLossSync(every=1), CSVLogger(path)).fit(DATA, 3, batch_size=4, eval_data=VAL, checkpoint_dir=ckpt, resume=True)
    assert comparable(path) == comparable(straight)
    assert path.read_text(encoding="utf-8").endswith("\n")


def test_tensorboard_steps_continue_across_a_mid_epoch_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(log_dir, tag):
        acc = EventAccumulator(str(log_dir))
        acc.Reload()
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    make(DeferredLossSync(every=1), TensorBoardLogger(tmp_path / "straight")).fit(DATA, 3, batch_size=4)
    log_dir, ckpt = tmp_path / "tb", tmp_path / "ckpt"
    make(DeferredLossSync(every=1), TensorBoardLogger(log_dir), StopAt(6)).fit(DATA, 3, batch_size=4, checkpoint_dir=ckpt)
    resumed = make(DeferredLossSync(every=1), TensorBoardLogger(log_dir))
    resumed.fit(DATA, 3, batch_size=4, checkpoint_dir=ckpt, resume=True)
    steps = [s for s, _ in scalars(log_dir, "train/loss")]
    assert steps == list(range(1, 13))  # each step once, in order, across the stop
    want = scalars(tmp_path / "straight", "train/loss")
    assert [v for _, v in scalars(log_dir, "train/loss")] == pytest.approx([v for _, v in want])
    assert [s for s, _ in scalars(log_dir, "epoch/loss")] == [4, 8, 12]
