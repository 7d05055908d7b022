"""Checkpoints: checksummed, checked whole before anything is applied, never holding a broken run."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from conftest import TinySeq2Seq, clone, ragged_pairs

from hlbd_fast import (
    CheckpointError,
    DeferredLossSync,
    FastTrainer,
    FusedAdamW,
    GradientAccumulation,
    NonFiniteError,
    NonFiniteGradientError,
    Strategy,
    load_weights,
)
from hlbd_fast.checkpoint import read_checkpoint, write_checkpoint


def make(model=None, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("seed", 0)
    return FastTrainer(model if model is not None else TinySeq2Seq(), **kw)


def snapshot(t: FastTrainer) -> dict:
    return {
        "model": {k: v.clone() for k, v in t.model.state_dict().items()},
        "optimizer": repr(t.optimizer.state_dict()),
        "counters": (t.epoch, t.global_step, t.seed, t.lr, len(t.history)),
        "rng": torch.get_rng_state().clone(),
    }


def same(a: dict, b: dict) -> bool:
    return (
        all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        and a["optimizer"] == b["optimizer"]
        and a["counters"] == b["counters"]
        and torch.equal(a["rng"], b["rng"])
    )


@pytest.fixture
def saved(tmp_path, pairs):
    """A trainer with Adam and GradientAccumulation(2), trained one epoch and saved."""
    t = make(strategies=[GradientAccumulation(2)], lr=1e-3)
    t.fit(pairs, 1, batch_size=8)
    path = tmp_path / "c.pt"
    t.save(path)
    return t, path


# ---------------------------------------------------------------------------- damaged files
def test_flipped_bytes_in_the_payload_are_caught(saved):
    _, path = saved
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))
    t = make(strategies=[GradientAccumulation(2)])
    before = snapshot(t)
    with pytest.raises(CheckpointError, match="damaged|could not be read"):
        t.load(path)
    assert same(before, snapshot(t))


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_load_weights_gives_named_errors(tmp_path, content):
    path = tmp_path / "w.pt"
    if content is None:  # a foreign torch file: a plain state dict
        torch.save(TinySeq2Seq().state_dict(), path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path)):
        load_weights(TinySeq2Seq(), path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(TinySeq2Seq(), tmp_path / "missing.pt")


def test_load_weights_refuses_another_model_shape(saved):
    _, path = saved
    with pytest.raises(CheckpointError, match=r"does not fit this model.*emb.weight: \(23, 16\) saved, \(30, 16\) here"):
        load_weights(TinySeq2Seq(vocab_size=30), path)


def test_a_checkpoint_of_version_1_still_loads(saved, tmp_path):
    """0.1 wrote the state itself (no envelope, no checksum): still read."""
    t, _ = saved
    old = tmp_path / "old.pt"
    state = t.state_dict()
    torch.save(state, old)
    other = make(strategies=[GradientAccumulation(2)], lr=1e-3)
    other.load(old)
    assert other.global_step == t.global_step
    assert all(torch.equal(p, q) for p, q in zip(other.model.parameters(), t.model.parameters()))


def test_stale_temporaries_of_killed_writers_are_removed(saved):
    t, path = saved
    dead = path.with_name(f".{path.name}.tmp-999999999")  # no such process
    alive = path.with_name(f".{path.name}.tmp-{os.getppid()}")  # a running process: left alone
    dead.write_bytes(b"half")
    alive.write_bytes(b"half")
    t.save(path)
    assert not dead.exists() and alive.exists()


# ---------------------------------------------------------------------------- checked before applied
def test_a_failed_load_leaves_the_trainer_as_it_was(saved):
    """A checkpoint that fits in every structural way but whose strategy state cannot be applied."""
    _, path = saved

    class Fragile(Strategy):
        def state_dict(self):
            return {"x": 1}

        def load_state_dict(self, state):
            raise RuntimeError("cannot take this state")

    t0 = make(strategies=[GradientAccumulation(2), Fragile()], lr=1e-3)
    t0.fit(ragged_pairs(), 1, batch_size=8)
    t0.save(path)
    t = make(strategies=[GradientAccumulation(2), Fragile()], lr=1e-3)
    before = snapshot(t)
    with pytest.raises(CheckpointError, match="could not be applied.*cannot take this state.*unchanged"):
        t.load(path)
    assert same(before, snapshot(t))


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: make(TinySeq2Seq(d=8), strategies=[GradientAccumulation(2)]), r"does not fit this model.*saved.*here"),
        (lambda: make(strategies=[GradientAccumulation(2), FusedAdamW(weight_decay=0.1)]), "written with optimizer Adam; this trainer uses AdamW"),
        (lambda: make(), "GradientAccumulation steps 2; this trainer has 1"),
        (lambda: make(strategies=[GradientAccumulation(2)], loss_normalization="micro_batch"), "loss_normalization 'tokens'"),
    ],
)
def test_structural_mismatches_are_refused_naming_the_difference(saved, build, match):
    _, path = saved
    t = build()
    before = snapshot(t)
    with pytest.raises(CheckpointError, match=match):
        t.load(path)
    assert same(before, snapshot(t))


def test_restored_hyperparameters_are_said_and_followed(saved):
    _, path = saved  # saved with Adam lr=1e-3
    t = make(strategies=[GradientAccumulation(2)], lr=1e-2)
    with pytest.warns(UserWarning, match=r"restores the optimizer's lr=0.001 \(the trainer was built with 0.01\)"):
        t.load(path)
    assert t.lr == 1e-3 == t.optimizer.param_groups[0]["lr"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say when nothing changes
        make(strategies=[GradientAccumulation(2)], lr=1e-3).load(path)


def test_a_mid_epoch_resume_needs_the_same_batch_size(tmp_path, pairs):
    class StopAt(Strategy):
        def on_step_end(self, trainer):
            if trainer.global_step == 2:
                trainer.request_stop()

    make(strategies=[StopAt()]).fit(pairs, 2, batch_size=4, checkpoint_dir=tmp_path)
    assert read_checkpoint(tmp_path / "last.pt")["mid_epoch"]["batch_size"] == 4
    with pytest.raises(ValueError, match="stopped mid-epoch with batch_size=4; this fit uses batch_size=8"):
        make().fit(pairs, 2, batch_size=8, checkpoint_dir=tmp_path, resume=True)
    make().fit(pairs, 2, batch_size=4, checkpoint_dir=tmp_path, resume=True)  # the same: fine


def test_load_state_dict_is_the_same_check_in_memory(saved):
    t, _ = saved
    state = t.state_dict()
    other = make(strategies=[GradientAccumulation(2)], lr=1e-3)
    other.load_state_dict(state)
    assert other.global_step == t.global_step
    with pytest.raises(CheckpointError, match="GradientAccumulation steps"):
        make(lr=1e-3).load_state_dict(state)


# ---------------------------------------------------------------------------- never a broken run
class NanGradient(torch.autograd.Function):
    """Identity forward; NaN gradient backward (a finite loss with non-finite gradients)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class NanGradAt(TinySeq2Seq):
    """From the ``at``-th forward in training mode on, the output's gradient is NaN."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, src, tgt_in):
        out = super().forward(src, tgt_in)
        self.calls += self.training
        return NanGradient.apply(out) if self.training and self.calls >= self.at else out


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
@pytest.mark.parametrize("sync", [None, DeferredLossSync])
def test_non_finite_gradients_stop_the_run_and_are_never_checkpointed(tmp_path, pairs, max_grad_norm, sync):
    model = NanGradAt(at=8)  # 5 steps of 8 per epoch: the 8th step, in epoch 2
    t = make(model, strategies=[sync()] if sync else [], max_grad_norm=max_grad_norm)  # a fresh instance per trainer
    with pytest.raises(NonFiniteGradientError, match=r"gradients became NaN or inf at epoch 2, optimizer step 8.*untouched") as e:
        t.fit(pairs, 2, batch_size=8, checkpoint_dir=tmp_path)  # the bad step is in the last epoch
    assert (e.value.epoch, e.value.step) == (2, 8)
    state = read_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_save_refuses_non_finite_weights(tmp_path, pairs):
    t = make()
    t.fit(pairs, 1, batch_size=8)
    t.save(tmp_path / "good.pt")
    good = (tmp_path / "good.pt").read_bytes()
    with torch.no_grad():
        t.model.out.bias[0] = float("inf")
    with pytest.raises(NonFiniteError, match="weights hold NaN or inf.*no checkpoint was written"):
        t.save(tmp_path / "good.pt")
    assert (tmp_path / "good.pt").read_bytes() == good


def test_write_and_read_round_trip(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "x": [1, "a"]}
    write_checkpoint(state, tmp_path / "s.pt")
    back = read_checkpoint(tmp_path / "s.pt")
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["x"] == [1, "a"]


def test_the_trainer_state_round_trips_exactly(tmp_path, pairs):
    """save, load into a fresh trainer, train on: the same as training on without the round trip."""
    torch.manual_seed(0)
    base = TinySeq2Seq(dropout=0.2)
    a, b = clone(base), clone(base)
    ta = make(a, strategies=[GradientAccumulation(2)], lr=1e-3)
    ta.fit(pairs, 1, batch_size=4)
    ta.save(tmp_path / "x.pt")
    ha = ta.fit(pairs, 3, batch_size=4)  # the global RNG is shared: run on before building the second trainer
    tb = make(b, strategies=[GradientAccumulation(2)], lr=1e-3, seed=5)  # another seed: the checkpoint restores it
    tb.load(tmp_path / "x.pt")
    hb = tb.fit(pairs, 3, batch_size=4)
    assert ha.losses == hb.losses
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
