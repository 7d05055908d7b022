"""EarlyStopping: when it stops for a given sequence of metrics, what it writes, and that a resume keeps counting."""

from __future__ import annotations

import dataclasses
import math
import textwrap

import pytest
import torch
from conftest import TinySeq2Seq, ragged_pairs

from hlbd_fast import FastTrainer, Strategy
from hlbd_fast.checkpoint import read_checkpoint
from hlbd_fast.strategies.stopping import EarlyStopping, StopReport

DATA = ragged_pairs(n=8)
VAL = ragged_pairs(n=4, seed=3)


def make(*strategies):
    torch.manual_seed(0)
    return FastTrainer(TinySeq2Seq(), strategies=list(strategies), progress=False, seed=0, lr=1e-2)


class Scripted(Strategy):
    """Sets ``record.eval`` to the next metrics of a script (listed before EarlyStopping, it runs first).

    ``only_when_evaluated``: replace only the evaluations fit really made (eval_every > 1).
    """

    def __init__(self, values, name="loss", only_when_evaluated=False):
        self.values, self.name, self.only = values, name, only_when_evaluated

    def on_epoch_end(self, trainer, record):
        if self.only and record.eval is None:
            return
        record.eval = {self.name: self.values[record.epoch - 1], "tokens": 10.0}


def run(values, name="loss", epochs=None, **kw):
    stop = EarlyStopping(**kw)
    t = make(Scripted(values, name), stop)
    h = t.fit(DATA, epochs or len(values), batch_size=4)
    report = stop.report()
    return len(h), None if report is None else dataclasses.asdict(report), stop


# ---------------------------------------------------------------------------- when it stops
@pytest.mark.parametrize(
    "values, kw, stops_at",
    [
        ([1.0, 0.9, 0.95, 0.91, 0.92, 0.5], dict(patience=3), 5),  # best 0.9 at 2; 3, 4, 5 do not improve
        ([1.0, 0.9, 0.95, 0.8, 0.85, 0.9, 0.81, 0.1], dict(patience=3), 7),  # 0.8 resets the count
        ([1.0, 0.9, 0.95, 0.8], dict(patience=1), 3),  # the first evaluation that does not improve
        ([1.0, 1.0, 0.5], dict(patience=1), 2),  # equal is not better
        ([1.0, 0.96, 0.92, 0.90, 0.88], dict(patience=2, min_delta=0.05), 5),  # 0.96: no; 0.92: yes; 0.90, 0.88: no
        ([1.0, 0.96, 0.92], dict(patience=1, min_delta=0.05), 2),
        ([1.0, math.nan, 0.5], dict(patience=1), 2),  # NaN never improves
        ([1.0, 0.9, 0.8, 0.7], dict(patience=1), None),  # always better: trains every epoch
    ],
)
def test_loss_stops_after_patience_evaluations_without_improvement(values, kw, stops_at):
    epochs, info, _ = run(values, metric="eval_loss", **kw)
    if stops_at is None:
        assert epochs == len(values) and info is None
    else:
        assert epochs == stops_at
        assert info["epoch"] == stops_at and info["metric"] == "eval_loss"


def test_an_accuracy_is_best_high():
    values = [0.1, 0.2, 0.15, 0.2, 0.3]
    epochs, info, stop = run(values, name="token_accuracy", metric="eval_token_accuracy", patience=2)
    assert stop.direction == "max"
    assert epochs == 4  # 0.15 and 0.2 do not beat 0.2
    assert info == {"epoch": 4, "metric": "eval_token_accuracy", "best": 0.2, "best_epoch": 2}
    # read as a loss, the same sequence would stop at once
    assert run([0.1, 0.2, 0.15], name="token_loss", metric="eval_token_loss", patience=1)[0] == 2


def test_epochs_without_evaluation_do_not_count():
    """eval_every=2: evaluations after epochs 2, 4, 6 (and the last); only they count."""
    values = [None, 1.0, None, 1.5, None, 1.6, None, 0.1]
    stop = EarlyStopping(patience=2)
    t = make(Scripted(values, only_when_evaluated=True), stop)
    h = t.fit(DATA, 8, batch_size=4, eval_data=VAL, eval_every=2)
    assert len(h) == 6 and stop.report().epoch == 6
    assert [r.eval is not None for r in h] == [False, True] * 3


def test_the_real_evaluation_drives_it():
    stop = EarlyStopping("eval_loss", patience=1)
    t = make(stop)
    h = t.fit(DATA, 3, batch_size=4, eval_data=VAL)
    losses = [r.eval["loss"] for r in h]
    assert stop.best == min(losses) and stop.state_dict()["evaluations"] == len(h)


def test_the_last_checkpoint_is_written_at_the_epoch_it_stops(tmp_path):
    stop = EarlyStopping(patience=2)
    t = make(Scripted([1.0, 0.9, 0.95, 0.99, 0.1, 0.1]), stop)
    h = t.fit(DATA, 6, batch_size=4, checkpoint_dir=tmp_path, checkpoint_every=10)  # only the stop writes one
    assert len(h) == 4
    state = read_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 4
    assert stop.report().epoch == 4


def test_a_resumed_run_goes_on_counting(tmp_path):
    values = [1.0, 0.9, 0.95, 0.99, 0.98, 0.1]  # patience 3: stops after epoch 5
    first = EarlyStopping(patience=3)
    make(Scripted(values), first).fit(DATA, 4, batch_size=4, checkpoint_dir=tmp_path)
    assert first.wait == 2 and first.best == 0.9
    resumed = EarlyStopping(patience=3)
    h = make(Scripted(values), resumed).fit(DATA, 6, batch_size=4, checkpoint_dir=tmp_path, resume=True)
    assert len(h) == 5 and resumed.report() == StopReport(epoch=5, metric="eval_loss", best=0.9, best_epoch=2)
    assert read_checkpoint(tmp_path / "last.pt")["epoch"] == 5


# ---------------------------------------------------------------------------- loud failures
def test_a_fit_that_never_evaluates_is_refused_at_the_first_epoch_end():
    t = make(EarlyStopping())
    with pytest.raises(ValueError, match=r"EarlyStopping\(metric='eval_loss'\) needs evaluations: pass fit\(\.\.\., eval_data="):
        t.fit(DATA, 3, batch_size=4)
    assert t.epoch == 0
    with pytest.raises(ValueError, match="needs evaluations"):
        make(EarlyStopping()).train_epoch(DATA, batch_size=4)


def test_an_unknown_metric_names_the_ones_there_are():
    t = make(EarlyStopping("eval_bleu"))
    with pytest.raises(ValueError, match=r"metric='eval_bleu'.*it has 'eval_loss', 'eval_token_accuracy'"):
        t.fit(DATA, 1, batch_size=4, eval_data=VAL)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(metric="loss"), r"EarlyStopping\(metric='loss'\): metric must be 'eval_' \+ an evaluation metric"),
        (dict(metric="eval_"), "metric must be 'eval_'"),
        (dict(metric=3), "metric must be 'eval_'"),
        (dict(patience=0), r"EarlyStopping\(patience=0\): patience must be an integer >= 1"),
        (dict(patience=1.5), "patience must be an integer"),
        (dict(patience=True), "patience must be an integer"),
        (dict(min_delta=-0.1), r"EarlyStopping\(min_delta=-0.1\): min_delta must be a finite number >= 0"),
        (dict(min_delta=math.nan), "min_delta must be a finite number"),
        (dict(min_delta="0"), "min_delta must be a finite number"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        EarlyStopping(**kw)


def test_state_round_trips():
    stop = EarlyStopping(patience=5)
    s = EarlyStopping(patience=5)
    s.load_state_dict({"best": 0.9, "best_epoch": 2, "wait": 1, "evaluations": 3})
    assert s.state_dict() == {"best": 0.9, "best_epoch": 2, "wait": 1, "evaluations": 3}
    assert stop.state_dict() == {"best": None, "best_epoch": None, "wait": 0, "evaluations": 0}
    assert repr(stop) == "EarlyStopping(metric='eval_loss', patience=5, min_delta=0.0)"


def test_the_docstring_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    code = EarlyStopping.__doc__.split("Example::\n", 1)[1].split("\n    Args:", 1)[0]
    exec(compile(textwrap.dedent(code), "EarlyStopping example", "exec"), {})
    assert "StopReport(epoch=" in capsys.readouterr().out  # it stopped before the 50 epochs


# ---------------------------------------------------------------------------- before the first step, and after the stop
def weights(t):
    return [p.detach().clone() for p in t.model.parameters()]


@pytest.mark.parametrize("metric, match", [("eval_los", "did you mean 'eval_loss'"), ("eval_exact_match", "it has 'eval_loss'")])
def test_a_metric_fit_will_not_have_is_refused_before_the_first_step(metric, match):
    """A typo used to surface after epoch 1 had trained: a second fit then trained 3 epochs' steps for 2."""
    stop = EarlyStopping(metric, patience=5)
    t = make(stop)
    before = weights(t)
    with pytest.raises(ValueError, match=match):
        t.fit(DATA, 2, batch_size=4, eval_data=VAL)
    assert (t.epoch, t.global_step, len(t.history)) == (0, 0, 0)
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))
    stop.metric = "eval_loss"  # fixed
    h = t.fit(DATA, 2, batch_size=4, eval_data=VAL)
    assert (len(h), t.global_step) == (2, 4)


def test_a_metric_another_strategy_adds_is_read_at_the_epoch_end():
    stop = EarlyStopping("eval_bleu", patience=1)
    t = make(Scripted([1.0, 2.0, 3.0], name="bleu"), stop)
    assert len(t.fit(DATA, 3, batch_size=4, eval_data=VAL)) == 3  # bleu rises: best high, never stops


def test_a_stopped_run_stays_stopped_when_resumed(tmp_path):
    """Each resume=True after an early stop used to train one more epoch."""
    values = [1.0, 0.9, 0.95, 0.99, 0.1, 0.1]  # patience 2: stops after epoch 4
    first = EarlyStopping(patience=2)
    make(Scripted(values), first).fit(DATA, 6, batch_size=4, eval_data=VAL, checkpoint_dir=tmp_path)
    assert first.report().epoch == 4
    again = EarlyStopping(patience=2)
    t = make(Scripted(values), again)
    with pytest.warns(UserWarning, match="stopped this run after epoch 4 .*fit trains nothing more"):
        h = t.fit(DATA, 6, batch_size=4, eval_data=VAL, checkpoint_dir=tmp_path, resume=True)
    assert (len(h), t.global_step) == (4, 8) and again.report() == StopReport(epoch=4, metric="eval_loss", best=0.9, best_epoch=2)
    assert read_checkpoint(tmp_path / "last.pt")["epoch"] == 4
    more = EarlyStopping(patience=5)  # a larger patience trains on
    h = make(Scripted(values), more).fit(DATA, 6, batch_size=4, eval_data=VAL, checkpoint_dir=tmp_path, resume=True)
    assert len(h) == 6 and more.report() is None
