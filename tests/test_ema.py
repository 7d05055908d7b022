"""EMA: the average is the hand computation, evaluation uses it, training never sees it, resume is exact."""

from __future__ import annotations

import math
import textwrap
import warnings

import pytest
import torch
from conftest import TinySeq2Seq, ragged_pairs
from cuda_standin import StandInBackend

from hlbd_fast import CheckpointError, DeferredLossSync, DevicePreload, FastTrainer, Strategy, load_weights
from hlbd_fast.strategies.cuda_graph import CUDAGraphStep
from hlbd_fast.strategies.ema import EMA

DECAY = 0.75  # far from 1, so a few steps move the average visibly


def make(*strategies, model=None, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("seed", 0)
    kw.setdefault("lr", 1e-2)
    if model is None:
        torch.manual_seed(0)
        model = TinySeq2Seq()
    return FastTrainer(model, strategies=list(strategies), **kw)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class AfterEachStep(Strategy):
    """Records the model's weights after every optimizer step."""

    def __init__(self):
        self.seen = []

    def on_step_end(self, trainer):
        self.seen.append(weights(trainer.model))


class WithBuffers(TinySeq2Seq):
    """TinySeq2Seq with a float buffer that training moves, and an integer one."""

    def __init__(self):
        super().__init__()
        self.register_buffer("running", torch.zeros(16))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, src, tgt_in):
        if self.training:
            with torch.no_grad():
                self.running.mul_(0.5).add_(self.emb.weight[:16].mean(0), alpha=0.5)
                self.calls.add_(1)
        return super().forward(src, tgt_in)


# ---------------------------------------------------------------------------- the average
def test_the_average_is_the_hand_computation_over_the_steps():
    """ema = w after the first step, then decay * ema + (1 - decay) * w after each; buffers too, integers left alone."""
    torch.manual_seed(0)
    ema, rec = EMA(decay=DECAY), AfterEachStep()
    t = make(ema, rec, model=WithBuffers())
    t.fit(ragged_pairs(n=24), 1, batch_size=4)  # 6 steps
    assert len(rec.seen) == 6
    got = ema.averaged_state_dict()
    lerped = {k: v.clone() for k, v in rec.seen[0].items()}
    exact = {k: v.double() for k, v in rec.seen[0].items() if v.is_floating_point()}
    for w in rec.seen[1:]:
        for k in exact:
            lerped[k].lerp_(w[k], 1 - DECAY)
            exact[k] = DECAY * exact[k] + (1 - DECAY) * w[k].double()
    for k in exact:
        assert torch.equal(got[k], lerped[k]), k  # bit for bit: what torch.lerp computes
        torch.testing.assert_close(got[k].double(), exact[k], rtol=1e-6, atol=1e-7)  # the documented rule
    assert torch.equal(got["calls"], t.model.calls) and int(t.model.calls) == 6
    assert not torch.equal(got["running"], t.model.running)  # the float buffer was averaged
    assert not torch.equal(got["out.weight"], t.model.out.weight)


def test_before_the_first_step_the_average_is_the_weights_and_it_starts_from_the_first_step():
    """Weights loaded after the trainer was built are averaged from there (no trace of the initial weights)."""
    ema = EMA(decay=DECAY)
    t = make(ema)
    torch.manual_seed(5)
    pretrained = TinySeq2Seq().state_dict()
    t.model.load_state_dict(pretrained)
    assert same(ema.averaged_state_dict(), weights(t.model))
    with ema.eval_scope(t):  # nothing to swap in yet
        assert same(weights(t.model), pretrained)
    ema2, rec = EMA(decay=DECAY), AfterEachStep()
    t2 = make(ema2, rec)
    t2.model.load_state_dict(pretrained)
    t2.fit(ragged_pairs(n=8), 1, batch_size=8)  # one step
    assert same(ema2.averaged_state_dict(), rec.seen[0])


def test_averaged_state_dict_needs_a_trainer_and_is_a_copy():
    ema = EMA()
    with pytest.raises(RuntimeError, match="not in a trainer yet"):
        ema.averaged_state_dict()
    t = make(ema)
    t.fit(ragged_pairs(n=8), 1, batch_size=4)
    sd = ema.averaged_state_dict()
    sd["out.bias"].add_(1.0)
    assert not torch.equal(sd["out.bias"], ema.averaged_state_dict()["out.bias"])


# ---------------------------------------------------------------------------- evaluation
def test_evaluate_inside_ema_is_evaluating_the_averaged_weights():
    data = ragged_pairs(n=24)
    ema = EMA(decay=DECAY)
    t = make(ema)
    t.fit(data, 2, batch_size=4)
    training = weights(t.model)
    averaged = ema.averaged_state_dict()
    assert not same(training, averaged)
    m = t.evaluate(data)
    assert same(weights(t.model), training)  # the training weights are back, bit for bit
    other = TinySeq2Seq()
    other.load_state_dict(averaged)
    assert m == make(model=other).evaluate(data)
    plain = TinySeq2Seq()
    plain.load_state_dict(training)
    assert m != make(model=plain).evaluate(data)  # not the training weights'


def test_the_scope_restores_the_training_weights_on_an_error():
    ema = EMA(decay=DECAY)
    t = make(ema)
    t.fit(ragged_pairs(n=16), 1, batch_size=4)
    training = weights(t.model)
    with pytest.raises(RuntimeError, match="boom"):
        with ema.eval_scope(t):
            assert same(weights(t.model), ema.averaged_state_dict())
            raise RuntimeError("boom")
    assert same(weights(t.model), training)
    with ema.eval_scope(t), ema.eval_scope(t):  # nested: one swap
        assert same(weights(t.model), ema.averaged_state_dict())
    assert same(weights(t.model), training)


def test_a_fit_with_ema_trains_the_weights_of_one_without_and_best_pt_holds_the_average(tmp_path):
    data, val = ragged_pairs(n=24), ragged_pairs(n=12, seed=3)

    class AveragesPerEpoch(Strategy):
        def __init__(self, ema):
            self.ema, self.by_epoch = ema, {}

        def on_epoch_end(self, trainer, record):
            self.by_epoch[record.epoch] = self.ema.averaged_state_dict()

    ema = EMA(decay=DECAY)
    spy = AveragesPerEpoch(ema)
    t = make(ema, spy)
    h = t.fit(data, 3, batch_size=4, eval_data=val, checkpoint_dir=tmp_path, keep_best="eval_loss")
    ref = make()
    h_ref = ref.fit(data, 3, batch_size=4, eval_data=val)
    assert same(weights(t.model), weights(ref.model))
    assert h.losses == h_ref.losses
    assert [r.eval for r in h] != [r.eval for r in h_ref]  # evaluated with the average
    best = TinySeq2Seq()
    load_weights(best, tmp_path / "best.pt")
    assert same(weights(best), spy.by_epoch[h.best.epoch])
    last = TinySeq2Seq()
    load_weights(last, tmp_path / "last.pt")
    assert same(weights(last), weights(t.model))  # last.pt: the training weights


# ---------------------------------------------------------------------------- checkpoints
def test_resume_from_a_checkpoint_is_exact_for_the_weights_and_the_average(tmp_path):
    data, val = ragged_pairs(n=24), ragged_pairs(n=12, seed=3)
    first = EMA(decay=DECAY)
    make(first).fit(data, 1, batch_size=4, checkpoint_dir=tmp_path, eval_data=val)
    resumed_ema = EMA(decay=DECAY)
    resumed = make(resumed_ema)
    h = resumed.fit(data, 3, batch_size=4, checkpoint_dir=tmp_path, resume=True, eval_data=val)
    straight_ema = EMA(decay=DECAY)
    straight = make(straight_ema)
    h_ref = straight.fit(data, 3, batch_size=4, eval_data=val)
    assert same(weights(resumed.model), weights(straight.model))
    assert same(resumed_ema.averaged_state_dict(), straight_ema.averaged_state_dict())
    assert [r.eval for r in h] == [r.eval for r in h_ref]


def test_a_state_that_does_not_fit_is_refused_and_changes_nothing():
    ema = EMA(decay=DECAY)
    t = make(ema)
    t.fit(ragged_pairs(n=8), 1, batch_size=4)
    before = ema.averaged_state_dict()
    state = ema.state_dict()
    bad = {"started": True, "averaged": {k: v for k, v in state["averaged"].items() if k != "out.bias"}}
    with pytest.raises(ValueError, match="missing \\['out.bias'\\]"):
        ema.load_state_dict(bad)
    reshaped = {"started": True, "averaged": {**state["averaged"], "out.bias": torch.zeros(3)}}
    with pytest.raises(ValueError, match="out.bias has shape"):
        ema.load_state_dict(reshaped)
    assert same(ema.averaged_state_dict(), before)


def test_a_checkpoint_without_ema_state_starts_the_average_at_the_resumed_weights(tmp_path):
    data = ragged_pairs(n=16)
    make().fit(data, 1, batch_size=4, checkpoint_dir=tmp_path)
    ema, rec = EMA(decay=DECAY), AfterEachStep()
    t = make(ema, rec)
    t.fit(data, 2, batch_size=4, checkpoint_dir=tmp_path, resume=True)
    expected = {k: v.clone() for k, v in rec.seen[0].items()}
    for w in rec.seen[1:]:
        for k in expected:
            expected[k].lerp_(w[k], 1 - DECAY)
    assert same(ema.averaged_state_dict(), expected)


# ---------------------------------------------------------------------------- CUDA graphs (CPU stand-in)
def test_under_cuda_graph_replays_the_average_is_the_eager_one():
    """The update is captured with the step and replayed: the Python of the hook runs only at capture."""
    data = ragged_pairs(n=40)
    ema = EMA(decay=DECAY)
    backend = StandInBackend(extra_state=lambda: list(ema.state_dict()["averaged"].values()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = make(DevicePreload(), DeferredLossSync(), CUDAGraphStep(warmup_steps=1, backend=backend), ema)
    backend.trainer = t
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        t.fit(data, 2, batch_size=8)
    assert len(backend.graphs) == 1
    eager_ema = EMA(decay=DECAY)
    eager = make(DevicePreload(), DeferredLossSync(), eager_ema)
    eager.fit(data, 2, batch_size=8)
    assert same(weights(t.model), weights(eager.model))
    assert same(ema.averaged_state_dict(), eager_ema.averaged_state_dict())


# ---------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("decay", [1.5, 1.0, -0.1, math.nan, math.inf, "0.9", True, None])
def test_bad_decay_is_refused_naming_the_argument(decay):
    with pytest.raises(ValueError, match=r"EMA\(decay=.*\): decay must be a finite number >= 0 and < 1"):
        EMA(decay=decay)


def test_repr_and_a_checkpoint_of_another_model_is_refused(tmp_path):
    assert repr(EMA(0.9)) == "EMA(decay=0.9)"
    make(EMA()).fit(ragged_pairs(n=8), 1, batch_size=4, checkpoint_dir=tmp_path)

    class Wider(TinySeq2Seq):
        def __init__(self):
            super().__init__(d=8)

    t = make(EMA(), model=Wider())
    with pytest.raises(CheckpointError):
        t.load(tmp_path / "last.pt")


def test_the_docstring_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = EMA.__doc__.split("Example::\n", 1)[1].split("\n    Args:", 1)[0]
    exec(compile(textwrap.dedent(code), "EMA example", "exec"), {})
    assert (tmp_path / "ema.pt").is_file()
