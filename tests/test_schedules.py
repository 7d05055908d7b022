"""Learning-rate schedules: once per optimizer step, saved and resumed exactly."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from conftest import TinySeq2Seq, clone, ragged_pairs

from hlbd_fast import CheckpointError, FastTrainer, GradientAccumulation, Strategy
from hlbd_fast.schedules import warmup_cosine, warmup_cosine_factor


def make(model=None, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("seed", 0)
    kw.setdefault("lr", 1e-2)
    return FastTrainer(model if model is not None else TinySeq2Seq(), **kw)


class LrSeen(Strategy):
    """The lr each optimizer step used (read before clipping, i.e. before the step)."""

    def __init__(self):
        self.lrs = []

    def before_clip(self, trainer):
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])


def test_warmup_cosine_factor():
    f = [warmup_cosine_factor(s, 4, 14, 0.1) for s in range(16)]
    assert f[:5] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert f[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f[14] == f[15] == 0.1
    assert all(a >= b for a, b in zip(f[4:], f[5:]))  # decays after the warm-up


@pytest.mark.parametrize(
    "args, match",
    [
        ((-1, 10), "warmup_steps"),
        ((5, 5), "must exceed warmup_steps"),
        ((0, 0), "total_steps"),
        ((1, 10, 1.5), "min_ratio"),
        ((1, 10, -0.1), "min_ratio"),
        ((1.5, 10), "warmup_steps"),
    ],
)
def test_warmup_cosine_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        warmup_cosine(*args)


def test_stepped_once_per_optimizer_step_never_per_micro_batch():
    seen = LrSeen()
    t = make(strategies=[GradientAccumulation(4), seen], scheduler=warmup_cosine(3, 12))
    h = t.fit(ragged_pairs(n=40), 2, batch_size=2)  # 20 micro-batches = 5 steps per epoch
    assert t.global_step == 10 == t.scheduler.last_epoch
    assert seen.lrs == pytest.approx([1e-2 * warmup_cosine_factor(s, 3, 12) for s in range(10)])
    assert [r.lr for r in h] == pytest.approx([1e-2 * warmup_cosine_factor(s, 3, 12) for s in (5, 10)])


def test_a_scheduler_built_on_the_given_optimizer():
    model = TinySeq2Seq()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    t = make(model, optimizer=opt, scheduler=sched)
    t.fit(ragged_pairs(n=16), 1, batch_size=4)  # 4 steps
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


@pytest.mark.parametrize("stop_kind", ["epoch boundary", "mid-epoch"])
def test_resume_with_a_scheduler_is_exact(tmp_path, stop_kind):
    data = ragged_pairs(n=24)
    torch.manual_seed(0)
    base = TinySeq2Seq(dropout=0.2)
    full, part, resumed = clone(base), clone(base), clone(base)
    sched = lambda: warmup_cosine(2, 15, 0.2)  # noqa: E731

    class StopAt(Strategy):
        def on_step_end(self, trainer):
            if trainer.global_step == 4:  # epoch 2 of 3 steps each
                os.kill(os.getpid(), signal.SIGINT)

    torch.manual_seed(3)
    h_full = make(full, scheduler=sched()).fit(data, 4, batch_size=8)
    torch.manual_seed(3)
    if stop_kind == "mid-epoch":
        with pytest.raises(KeyboardInterrupt):
            make(part, scheduler=sched(), strategies=[StopAt()]).fit(data, 4, batch_size=8, checkpoint_dir=tmp_path)
    else:
        make(part, scheduler=sched()).fit(data, 2, batch_size=8, checkpoint_dir=tmp_path)
    t = make(resumed, scheduler=sched())
    h_res = t.fit(data, 4, batch_size=8, checkpoint_dir=tmp_path, resume=True)
    assert h_res.losses == h_full.losses and [r.lr for r in h_res] == [r.lr for r in h_full]
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), resumed.parameters()))


def test_a_checkpoint_with_a_scheduler_needs_one(tmp_path):
    t = make(scheduler=warmup_cosine(1, 10))
    t.fit(ragged_pairs(n=8), 1, batch_size=4)
    t.save(tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match="with a learning-rate scheduler; this trainer has none"):
        make().load(tmp_path / "s.pt")
    plain = make()
    plain.fit(ragged_pairs(n=8), 1, batch_size=4)
    plain.save(tmp_path / "p.pt")
    with pytest.warns(UserWarning) as record:
        make(scheduler=warmup_cosine(1, 10)).load(tmp_path / "p.pt")
    assert any("holds no scheduler state" in str(w.message) for w in record)


def test_bad_schedulers_are_refused_with_the_fix():
    other = torch.optim.SGD(TinySeq2Seq().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="built on another optimizer"):
        make(scheduler=torch.optim.lr_scheduler.StepLR(other, 2))
    with pytest.raises(TypeError, match="must be a callable optimizer -> LRScheduler"):
        make(scheduler=0.5)
    with pytest.raises(TypeError, match="returned float"):
        make(scheduler=lambda opt: 0.5)


def test_a_factory_building_on_another_optimizer_is_refused():
    """It was accepted, and the trainer's lr never changed."""
    other = torch.optim.SGD(TinySeq2Seq().parameters(), lr=0.1)
    with pytest.raises(
        ValueError, match=r"scheduler= returned a scheduler built on another optimizer.*lambda opt: torch.optim.lr_scheduler.StepLR\(opt, 100\)"
    ):
        make(scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(other, 2))


@pytest.mark.parametrize("form", ["factory", "instance"])
def test_reduce_lr_on_plateau_is_refused_when_the_trainer_is_built(form):
    """It was accepted, then raised TypeError (step() missing 'metrics') after the first optimizer step."""
    model = TinySeq2Seq()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
    kw = {"scheduler": lambda o: plateau(o)} if form == "factory" else {"optimizer": opt, "scheduler": plateau(opt)}
    with pytest.raises(ValueError, match=r"scheduler=ReduceLROnPlateau is stepped with a metric.*warmup_cosine.*EarlyStopping"):
        make(model, **kw)
