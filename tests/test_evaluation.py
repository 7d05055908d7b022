"""FastTrainer.evaluate and fit(eval_data=..., keep_best=...): what the model learned, without changing training."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TinySeq2Seq, clone, ragged_pairs

from hlbd_fast import DevicePreload, FastTrainer, GradientAccumulation, Strategy, TrimPadding, load_weights
from hlbd_fast.models import Seq2SeqTransformer


def make(model=None, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("seed", 0)
    kw.setdefault("lr", 1e-2)
    return FastTrainer(model if model is not None else TinySeq2Seq(), **kw)


def reference(dropout=0.0):
    torch.manual_seed(0)
    return Seq2SeqTransformer(vocab_size=23, d_model=16, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=32, dropout=dropout, max_length=16)


def by_hand(model, src, tgt):
    """Summed loss, token count and correct argmaxes, one sample at a time."""
    model.eval()
    loss = tokens = correct = 0.0
    with torch.no_grad():
        for i in range(len(src)):
            s, t = src[i : i + 1], tgt[i : i + 1]
            logits = model(s, t[:, :-1])
            out = t[:, 1:]
            real = out != 0
            loss += float(F.cross_entropy(logits[real], out[real], reduction="sum"))
            tokens += int(real.sum())
            correct += int((logits.argmax(-1)[real] == out[real]).sum())
    model.train()
    return loss, tokens, correct


# ---------------------------------------------------------------------------- evaluate
@pytest.mark.parametrize("batch_size", [1, 7, 40])
def test_evaluate_matches_a_hand_computation(batch_size):
    src, tgt = ragged_pairs(n=40)
    t = make()
    t.fit((src, tgt), 1, batch_size=8)
    m = t.evaluate((src, tgt), batch_size=batch_size)
    loss, tokens, correct = by_hand(t.model, src, tgt)
    assert m["tokens"] == tokens and m["samples"] == 40
    assert m["loss"] == pytest.approx(loss / tokens, rel=1e-6)
    assert m["token_accuracy"] == correct / tokens
    assert "exact_match" not in m


def test_evaluate_leaves_mode_weights_and_every_rng_as_they_were():
    src, tgt = ragged_pairs(n=16)
    t = make(reference(dropout=0.3))
    t.model.train()
    before = [p.detach().clone() for p in t.model.parameters()]
    rng = torch.get_rng_state()
    t.evaluate((src, tgt), generate=True)
    assert t.model.training
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(p, q) for p, q in zip(before, t.model.parameters()))
    t.model.eval()
    t.evaluate((src, tgt))
    assert not t.model.training


def test_exact_match_counts_rows_whose_greedy_output_is_the_target():
    src, tgt = ragged_pairs(n=12, tgt_len=8)
    tgt[:, -1] = 0
    for i in range(12):  # close every target with EOS (3) after its text
        n = int((tgt[i] != 0).sum())
        tgt[i, n] = 3
    t = make(reference(), lr=3e-2)
    t.fit((src, tgt), 30, batch_size=4)
    m = t.evaluate((src, tgt), generate=True)
    model = t.model.eval()
    with torch.no_grad():
        out = model.generate(src, max_new_tokens=tgt.shape[1] - 1)
    hand = 0
    for i in range(12):
        want = tgt[i, 1:].tolist()
        want = want[: want.index(3) + 1]
        got = out[i].tolist()
        got = got[: got.index(3) + 1] if 3 in got else got
        hand += got == want
    assert m["exact_match"] == hand / 12
    assert 0 < m["exact_match"] and m["token_accuracy"] > 0.5  # the comparison means something


def test_evaluate_with_a_trimming_trainer_is_the_same_up_to_rounding():
    src, tgt = ragged_pairs(n=24)
    pad = torch.zeros(24, 4, dtype=torch.long)
    data = (torch.cat([src, pad], 1), torch.cat([tgt, pad], 1))
    plain, trimmed = make(reference()), make(reference(), strategies=[DevicePreload(), TrimPadding(multiple_of=1)])
    a, b = plain.evaluate(data, batch_size=8), trimmed.evaluate(data, batch_size=8)
    assert a["tokens"] == b["tokens"] and a["token_accuracy"] == b["token_accuracy"]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)


def test_evaluate_accepts_a_dataset_and_a_loader():
    src, tgt = ragged_pairs(n=20)
    t = make()
    want = t.evaluate((src, tgt), batch_size=5)
    ds = torch.utils.data.TensorDataset(src, tgt)
    assert t.evaluate(ds, batch_size=5) == pytest.approx(want)
    assert t.evaluate(torch.utils.data.DataLoader(ds, batch_size=3)) == pytest.approx(want)


def test_evaluate_bad_inputs():
    t = make()
    with pytest.raises(ValueError, match="has no generate"):
        t.evaluate(ragged_pairs(n=4), generate=True)
    with pytest.raises(ValueError, match="generate='yes'"):
        t.evaluate(ragged_pairs(n=4), generate="yes")
    with pytest.raises(ValueError, match="batch_size=0"):
        t.evaluate(ragged_pairs(n=4), batch_size=0)


# ---------------------------------------------------------------------------- fit(eval_data=...)
def test_fit_with_evaluation_trains_bit_identical_weights(tmp_path):
    src, tgt = ragged_pairs(n=40)
    torch.manual_seed(0)
    base = TinySeq2Seq(dropout=0.3)
    a, b = clone(base), clone(base)
    ha = make(a, strategies=[GradientAccumulation(2)]).fit((src, tgt), 3, batch_size=4, eval_data=(src[:20], tgt[:20]))
    hb = make(b, strategies=[GradientAccumulation(2)]).fit((src, tgt), 3, batch_size=4)
    assert ha.losses == hb.losses
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(set(r.eval) == {"loss", "token_accuracy", "tokens", "samples"} for r in ha)
    assert all(r.eval is None for r in hb)
    ha.save_json(tmp_path / "h.json")
    saved = json.loads((tmp_path / "h.json").read_text())
    assert saved["epochs"][2]["eval"]["loss"] == ha[2].eval["loss"]
    assert all(math.isfinite(r.lr) for r in ha)


def test_eval_every_and_the_last_epoch():
    h = make().fit(ragged_pairs(n=16), 5, batch_size=8, eval_data=ragged_pairs(n=8), eval_every=2)
    assert [r.eval is not None for r in h] == [False, True, False, True, True]
    assert h.eval_seconds > 0 and sum(h.seconds) > 0  # evaluation time is kept out of the epochs' seconds


class Snapshots(Strategy):
    """The weights at every epoch's end, and the eval loss the trainer measured then."""

    def __init__(self):
        self.weights, self.eval_losses = [], []

    def on_epoch_end(self, trainer, record):
        self.weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        self.eval_losses.append(record.eval["loss"])


def test_keep_best_writes_the_best_epochs_weights(tmp_path):
    train, held_out = ragged_pairs(n=32, seed=1), ragged_pairs(n=16, seed=2)
    snaps = Snapshots()
    t = make(strategies=[snaps], lr=3e-2)  # a high lr on random data: held-out loss rises after a while
    t.fit(train, 8, batch_size=8, eval_data=held_out, keep_best="eval_loss", checkpoint_dir=tmp_path)
    best = min(range(8), key=lambda i: snaps.eval_losses[i])
    assert best < 7, snaps.eval_losses  # the test needs a best epoch that is not the last
    b = t.history.best
    assert (b.metric, b.value, b.epoch, b.path) == ("eval_loss", snaps.eval_losses[best], best + 1, str(tmp_path / "best.pt"))
    model = TinySeq2Seq()
    load_weights(model, tmp_path / "best.pt")
    assert all(torch.equal(v, snaps.weights[best][k]) for k, v in model.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_keep_best_accuracy_is_best_high(tmp_path):
    data = ragged_pairs(n=16)
    t = make()
    t.fit(data, 3, batch_size=8, eval_data=data, keep_best="eval_token_accuracy", checkpoint_dir=tmp_path)
    accs = [r.eval["token_accuracy"] for r in t.history]
    assert t.history.best.value == max(accs)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"keep_best": "eval_loss", "checkpoint_dir": "x"}, "needs eval_data"),
        ({"keep_best": "eval_loss", "eval_data": ragged_pairs(n=4)}, "needs checkpoint_dir"),
        ({"keep_best": "loss", "eval_data": ragged_pairs(n=4), "checkpoint_dir": "x"}, "keep_best='loss' is not one of"),
        ({"eval_data": ragged_pairs(n=4), "eval_every": 0}, "eval_every=0"),
        ({"eval_data": [1, 2]}, "data must be a"),
    ],
)
def test_fit_evaluation_arguments_are_checked_before_training(kw, match):
    t = make()
    with pytest.raises((ValueError, TypeError), match=match):
        t.fit(ragged_pairs(n=8), 1, batch_size=8, **kw)
    assert t.global_step == 0


# ---------------------------------------------------------------------------- the best checkpoint is never lost
class Scripted(Strategy):
    """Replaces each epoch's evaluation with scripted values (by 1-based epoch), before keep_best reads it."""

    def __init__(self, values, name="loss"):
        self.values, self.name = values, name

    def on_epoch_end(self, trainer, record):
        record.eval = {self.name: self.values[record.epoch], "tokens": 10.0}


def weights_of(path):
    model = TinySeq2Seq()
    load_weights(model, path)
    return [p.detach().clone() for p in model.parameters()]


def test_a_resume_keeps_the_best_of_the_interrupted_run(tmp_path):
    """Losses 3.065, 3.069, 2.979 (best: epoch 3), then a resume to 6 epochs whose epoch 4 scores 3.056: best.pt stays."""
    values = {1: 3.065, 2: 3.069, 3: 2.979, 4: 3.056, 5: 3.1, 6: 3.2}
    data = ragged_pairs(n=16)
    make(strategies=[Scripted(values)]).fit(data, 3, batch_size=8, eval_data=data, keep_best="eval_loss", checkpoint_dir=tmp_path)
    best = weights_of(tmp_path / "best.pt")
    t = make(strategies=[Scripted(values)])
    t.fit(data, 6, batch_size=8, eval_data=data, keep_best="eval_loss", checkpoint_dir=tmp_path, resume=True)
    assert (t.history.best.epoch, t.history.best.value) == (3, 2.979)
    assert all(torch.equal(a, b) for a, b in zip(best, weights_of(tmp_path / "best.pt")))


def test_another_metric_starts_its_own_record(tmp_path):
    """A loss of 3.1 is no record for an accuracy: the first accuracy evaluation writes best.pt."""
    data = ragged_pairs(n=16)
    t = make(strategies=[Scripted({1: 3.2, 2: 3.1, 3: 0.05, 4: 0.04}, name="loss")])
    t.fit(data, 2, batch_size=8, eval_data=data, keep_best="eval_loss", checkpoint_dir=tmp_path)
    t.strategies[0].name = "token_accuracy"  # the same trainer, now following an accuracy
    t.fit(data, 4, batch_size=8, eval_data=data, keep_best="eval_token_accuracy", checkpoint_dir=tmp_path)
    assert (t.history.best.metric, t.history.best.epoch, t.history.best.value) == ("eval_token_accuracy", 3, 0.05)


def test_a_fresh_checkpoint_dir_gets_its_own_best(tmp_path):
    data = ragged_pairs(n=16)
    t = make(strategies=[Scripted({1: 1.0, 2: 1.5, 3: 2.0, 4: 3.0})])
    t.fit(data, 2, batch_size=8, eval_data=data, keep_best="eval_loss", checkpoint_dir=tmp_path / "a")
    t.fit(data, 4, batch_size=8, eval_data=data, keep_best="eval_loss", checkpoint_dir=tmp_path / "b")
    assert t.history.best.epoch == 3 and t.history.best.path == str(tmp_path / "b" / "best.pt")
    weights_of(tmp_path / "b" / "best.pt")  # it exists and loads


def test_a_nan_evaluation_is_never_best(tmp_path):
    data = ragged_pairs(n=16)
    t = make(strategies=[Scripted({1: float("nan"), 2: 2.0, 3: 3.0})])
    t.fit(data, 3, batch_size=8, eval_data=data, keep_best="eval_loss", checkpoint_dir=tmp_path)
    assert (t.history.best.epoch, t.history.best.value) == (2, 2.0)


def test_best_and_last_as_directories_are_refused_before_training(tmp_path):
    (tmp_path / "best.pt").mkdir()
    t = make()
    with pytest.raises(ValueError, match="best.pt"):
        t.fit(ragged_pairs(n=8), 1, batch_size=8, eval_data=ragged_pairs(n=8), keep_best="eval_loss", checkpoint_dir=tmp_path)
    assert t.global_step == 0


def test_trimming_in_evaluation_is_proven_or_refused(tmp_path):
    """Evaluation with TrimPadding on a model that lets padding leak is refused, never different from plain evaluation."""

    class Leaky(TinySeq2Seq):
        def forward(self, src, tgt_in):  # pools over every source position, padding included
            out = super().forward(src, tgt_in)
            return out + src.float().mean(dim=1, keepdim=True).unsqueeze(-1) * 0.1

    src, tgt = ragged_pairs(n=16)
    src = torch.cat([src, torch.zeros(16, 5, dtype=torch.long)], 1)
    torch.manual_seed(0)
    plain = make(Leaky()).evaluate((src, tgt))
    with pytest.raises(ValueError, match="TrimPadding refused this model"):
        make(Leaky(), strategies=[TrimPadding(multiple_of=1)]).evaluate((src, tgt))
    torch.manual_seed(0)
    exact = make(TinySeq2Seq()).evaluate((src, tgt))
    torch.manual_seed(0)
    trimmed = make(TinySeq2Seq(), strategies=[TrimPadding(multiple_of=1)]).evaluate((src, tgt))
    assert trimmed["loss"] == pytest.approx(exact["loss"], rel=1e-5) and math.isfinite(plain["loss"])


# ---------------------------------------------------------------------------- exact match with the data's BOS and EOS
def bos1_eos4_pairs():
    """Targets ``1 text 4 0...``: BOS 1 and EOS 4, not the reference model's default 2 and 3."""
    src, tgt = ragged_pairs(n=12, tgt_len=8)
    tgt = tgt.masked_fill(tgt == 4, 5)  # 4 only ends a target
    tgt[:, 0] = 1
    tgt[:, -1] = 0
    for i in range(12):
        tgt[i, int((tgt[i] != 0).sum())] = 4
    return src, tgt


def test_exact_match_generates_with_the_datas_bos_and_eos():
    """With BOS 1 / EOS 4 data exact match used to decode from the model's defaults (2/3) and report 0."""
    src, tgt = bos1_eos4_pairs()
    t = make(reference(), lr=3e-2)
    t.fit((src, tgt), 30, batch_size=4)
    m = t.evaluate((src, tgt), generate=True)
    assert m["token_accuracy"] > 0.5
    with torch.no_grad():
        out = t.model.eval().generate(src, max_new_tokens=tgt.shape[1] - 1, bos_id=1, eos_id=4)
    hand = 0
    for i in range(12):
        want = tgt[i, 1:].tolist()
        want = want[: want.index(4) + 1]
        got = out[i].tolist()
        hand += (got[: got.index(4) + 1] if 4 in got else got) == want
    assert 0 < hand and m["exact_match"] == hand / 12
    assert t.evaluate((src, tgt), generate=True, bos_id=1, eos_id=4)["exact_match"] == m["exact_match"]
    assert t.evaluate((src, tgt), generate=True, bos_id=2, eos_id=3)["exact_match"] < m["exact_match"]  # the old defaults


def test_generate_needs_one_bos_or_an_explicit_one():
    src, tgt = bos1_eos4_pairs()
    tgt[0, 0] = 2
    t = make(reference())
    with pytest.raises(ValueError, match=r"targets start with different ids \(1 to 2\).*pass bos_id="):
        t.evaluate((src, tgt), generate=True)
    assert "exact_match" in t.evaluate((src, tgt), generate=True, bos_id=1)
    with pytest.raises(ValueError, match=r"evaluate\(bos_id=-1\)"):
        t.evaluate((src, tgt), generate=True, bos_id=-1)
