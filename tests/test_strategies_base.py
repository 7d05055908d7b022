"""The strategy protocol: one object per role whose default is the plain loop; hooks that add; scopes that clean up."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from conftest import TinySeq2Seq, clone, ragged_pairs

from hlbd_fast import FastTrainer, GradientAccumulation, Strategy, StrategyConflictError
from hlbd_fast.strategies import (
    ROLES,
    Accumulation,
    BatchSource,
    DeferredLossSync,
    Distribution,
    Forward,
    LossReadback,
    OptimizerFactory,
    Precision,
    StepRunner,
)


def make(model=None, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("seed", 0)
    return FastTrainer(model if model is not None else TinySeq2Seq(), **kw)


# ---------------------------------------------------------------------------- roles
def test_without_strategies_every_role_holds_its_plain_default():
    t = make()
    defaults = {
        "distribution": Distribution,
        "precision": Precision,
        "optimizer": OptimizerFactory,
        "accumulation": Accumulation,
        "batches": BatchSource,
        "forward": Forward,
        "step": StepRunner,
        "readback": LossReadback,
    }
    assert tuple(defaults) == ROLES
    for role, cls in defaults.items():
        assert type(getattr(t.roles, role)) is cls
    assert isinstance(t.optimizer, torch.optim.Adam) and t.accumulation == 1
    with pytest.raises(AttributeError, match="decided when the trainer is built"):
        t.roles.precision = Precision()


def test_a_subclassed_role_replaces_one_part_and_is_what_the_loop_calls(pairs):
    """A precision that counts backward calls and steps: the loop goes through it, once per micro-batch/step."""

    class Counting(Precision):
        def __init__(self):
            self.backwards = self.steps = 0

        def backward(self, trainer, loss):
            self.backwards += 1
            super().backward(trainer, loss)

        def optimizer_step(self, trainer):
            self.steps += 1
            return super().optimizer_step(trainer)

    torch.manual_seed(0)
    base = TinySeq2Seq()
    a, b = clone(base), clone(base)
    counting = Counting()
    ha = make(a, strategies=[counting, GradientAccumulation(2)]).fit(pairs, 1, batch_size=4)
    hb = make(b, strategies=[GradientAccumulation(2)]).fit(pairs, 1, batch_size=4)
    assert (counting.backwards, counting.steps) == (10, 5)
    assert ha.losses == hb.losses and all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_two_strategies_for_one_role_name_both():
    with pytest.raises(StrategyConflictError, match=r"DeferredLossSync\(every=None\) and DeferredLossSync\(every=3\) both fill the role 'readback'"):
        make(strategies=[DeferredLossSync(), DeferredLossSync(every=3)])


# ---------------------------------------------------------------------------- ownership and lifecycle
class Closing(Strategy):
    """Counts its close() calls."""

    def __init__(self):
        self.closed = 0

    def close(self):
        self.closed += 1


class ClosingSource(BatchSource):
    """A role object that counts its close() calls."""

    def __init__(self):
        self.closed = 0

    def close(self):
        self.closed += 1


@pytest.mark.parametrize("kind", ["EMA", "EarlyStopping"])
def test_one_instance_serves_one_trainer(kind):
    from hlbd_fast import EMA, EarlyStopping

    s = EMA() if kind == "EMA" else EarlyStopping()
    first = make(strategies=[s])
    with pytest.raises(ValueError, match=f"{kind}.*already belongs to another FastTrainer.*Build a fresh instance"):
        make(strategies=[s])
    first.close()
    make(strategies=[s])  # free again once its trainer is closed


def test_a_trainer_that_failed_to_build_owns_nothing():
    s = Closing()
    with pytest.raises(StrategyConflictError):
        make(strategies=[s, DeferredLossSync(), DeferredLossSync(every=3)])
    assert s.closed == 1
    make(strategies=[s])  # not held by the trainer that failed


def test_close_is_idempotent_reaches_every_strategy_and_ends_the_trainer(pairs):
    plain, source = Closing(), ClosingSource()
    t = make(strategies=[plain, source])
    t.fit(pairs, 1, batch_size=8)
    t.close()
    t.close()
    assert (plain.closed, source.closed) == (1, 1)
    for call in (lambda: t.fit(pairs, 2), lambda: t.train_epoch(pairs), lambda: t.evaluate(pairs)):
        with pytest.raises(RuntimeError, match="this trainer was closed; build a new FastTrainer"):
            call()


def test_with_closes_on_every_exit_path(pairs):
    s = Closing()
    with make(strategies=[s]) as t:
        t.fit(pairs, 1, batch_size=8)
    assert s.closed == 1

    class Boom(Strategy):
        def on_step_end(self, trainer):
            raise RuntimeError("boom")

    s2 = Closing()
    with pytest.raises(RuntimeError, match="boom"):
        with make(strategies=[s2, Boom()]) as t:
            t.fit(pairs, 1, batch_size=8)
    assert s2.closed == 1


def test_reports_gather_what_strategies_report(pairs):
    from hlbd_fast import EarlyStopping
    from hlbd_fast.strategies.stopping import StopReport

    class Scripted(Strategy):
        def on_epoch_end(self, trainer, record):
            record.eval = {"loss": float(record.epoch), "tokens": 1.0}  # worse every epoch

    stop = EarlyStopping(patience=1)
    t = make(strategies=[Scripted(), stop])
    assert t.reports() == {}
    t.fit(pairs, 5, batch_size=8, eval_data=pairs)
    assert t.reports() == {"EarlyStopping": StopReport(epoch=2, metric="eval_loss", best=1.0, best_epoch=1)}


# ---------------------------------------------------------------------------- scopes
class Scoped(Strategy):
    """Records entering and leaving its run and epoch scopes, and how they were left."""

    def __init__(self, fail_at_step=None, stop_at_step=None, sigint_at_step=None):
        self.events: list[str] = []
        self.fail_at, self.stop_at, self.sigint_at = fail_at_step, stop_at_step, sigint_at_step

    class _Scope:
        def __init__(self, owner, name):
            self.owner, self.name = owner, name

        def __enter__(self):
            self.owner.events.append(f"enter {self.name}")

        def __exit__(self, kind, value, tb):
            self.owner.events.append(f"exit {self.name}" + (f" ({kind.__name__})" if kind else ""))

    def run_scope(self, trainer):
        return self._Scope(self, "run")

    def epoch_scope(self, trainer, epoch):
        return self._Scope(self, f"epoch {epoch}")

    def on_step_end(self, trainer):
        if trainer.global_step == self.fail_at:
            raise RuntimeError("boom")
        if trainer.global_step == self.stop_at:
            trainer.request_stop()
        if trainer.global_step == self.sigint_at:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("entry", ["fit", "train_epoch"])
def test_scopes_are_entered_and_left_on_a_normal_run(pairs, entry):
    s = Scoped()
    t = make(strategies=[s])
    if entry == "fit":
        t.fit(pairs, 2, batch_size=8)
        assert s.events == ["enter run", "enter epoch 0", "exit epoch 0", "enter epoch 1", "exit epoch 1", "exit run"]
    else:
        t.train_epoch(pairs, batch_size=8)
        assert s.events == ["enter run", "enter epoch 0", "exit epoch 0", "exit run"]


@pytest.mark.parametrize("entry", ["fit", "train_epoch"])
def test_scopes_are_left_when_the_run_fails(pairs, entry):
    s = Scoped(fail_at_step=2)
    t = make(strategies=[s])
    with pytest.raises(RuntimeError, match="boom"):
        t.fit(pairs, 2, batch_size=8) if entry == "fit" else t.train_epoch(pairs, batch_size=8)
    assert s.events == ["enter run", "enter epoch 0", "exit epoch 0 (RuntimeError)", "exit run (RuntimeError)"]


def test_scopes_are_left_on_request_stop_and_on_ctrl_c(pairs, tmp_path):
    s = Scoped(stop_at_step=2)
    make(strategies=[s]).fit(pairs, 2, batch_size=8)
    assert s.events == ["enter run", "enter epoch 0", "exit epoch 0", "exit run"]
    s = Scoped(sigint_at_step=7)
    with pytest.raises(KeyboardInterrupt):
        make(strategies=[s]).fit(pairs, 2, batch_size=8, checkpoint_dir=tmp_path)
    assert s.events[-2:] == ["exit epoch 1", "exit run"]
    assert (tmp_path / "last.pt").exists()


def test_a_scope_that_fails_to_enter_leaves_the_earlier_ones(pairs):
    first = Scoped()

    class Refuses(Strategy):
        def epoch_scope(self, trainer, epoch):
            raise RuntimeError("cannot install")

    with pytest.raises(RuntimeError, match="cannot install"):
        make(strategies=[first, Refuses()]).fit(pairs, 1, batch_size=8)
    assert first.events == ["enter run", "enter epoch 0", "exit epoch 0 (RuntimeError)", "exit run (RuntimeError)"]


def test_hooks_see_the_trainer_in_loop_order(pairs):
    seen = []

    class Order(Strategy):
        def setup(self, trainer):
            seen.append("setup")

        def wrap_model(self, trainer, model):
            seen.append("wrap_model")
            return model

        def on_epoch_start(self, trainer, epoch):
            seen.append("on_epoch_start")

        def prepare_batch(self, trainer, batch):
            seen.append("prepare_batch")
            return batch

        def on_step_start(self, trainer):
            seen.append("on_step_start")

        def before_clip(self, trainer):
            seen.append("before_clip")

        def on_step_end(self, trainer):
            seen.append("on_step_end")

        def on_loss_read(self, trainer, figures):
            seen.append("on_loss_read")

        def on_epoch_end(self, trainer, record):
            seen.append("on_epoch_end")

    make(strategies=[Order()]).fit(ragged_pairs(n=8), 1, batch_size=8)
    assert seen == ["setup", "wrap_model", "on_epoch_start", "prepare_batch", "on_step_start", "before_clip", "on_step_end", "on_loss_read", "on_epoch_end"]
