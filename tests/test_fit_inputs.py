"""What fit and the trainer check before the first step: evaluation data, the pad id; and evaluations that measured nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import TinySeq2Seq, clone, ragged_pairs
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from hlbd_fast import FastTrainer
from hlbd_fast.models import Seq2SeqTransformer

DATA = ragged_pairs(n=8)
VAL = ragged_pairs(n=6, seed=3)


def make(model=None, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("seed", 0)
    kw.setdefault("lr", 1e-2)
    torch.manual_seed(0)
    return FastTrainer(model if model is not None else TinySeq2Seq(), **kw)


def weights(t):
    return [p.detach().clone() for p in t.model.parameters()]


class DictItems(Dataset):
    """(src, tgt) pairs as dict items: a format the plain trainer's forward does not take."""

    def __init__(self, src, tgt):
        self.src, self.tgt = src, tgt

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        return {"src": self.src[i], "tgt": self.tgt[i]}


def out_of_vocabulary():
    src, tgt = ragged_pairs(n=6, seed=3)
    src[0, 0] = 99  # the model has 23 ids
    return DataLoader(TensorDataset(src, tgt), batch_size=3)


# ---------------------------------------------------------------------------- evaluation data, before the first step
@pytest.mark.parametrize(
    "bad, match",
    [
        (DictItems(*VAL), r"eval_data \(its first batch\): .*got a dict with keys \['src', 'tgt'\].*override forward_logits"),
        (out_of_vocabulary(), r"eval_data \(its first batch\): src holds token id 99 but the model's vocabulary has 23 ids"),
        (TensorDataset(*VAL), None),  # the fixed data: a Dataset of pairs
    ],
    ids=["dict items", "ids outside the vocabulary", "fixed"],
)
def test_evaluation_data_is_checked_before_the_first_step(bad, match):
    """Both used to fail after epoch 1 had trained: a second fit then trained 12 steps instead of 8."""
    t = make()
    before = weights(t)
    if match is not None:
        with pytest.raises((TypeError, ValueError), match=match):
            t.fit(DATA, 4, batch_size=4, eval_data=bad)
        assert (t.epoch, t.global_step, len(t.history)) == (0, 0, 0)
        assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))
        bad = TensorDataset(*VAL)
    h = t.fit(DATA, 4, batch_size=4, eval_data=bad)
    assert (len(h), t.global_step) == (4, 8) and all(r.eval["samples"] == 6 for r in h)


def test_checking_the_first_batch_draws_nothing_from_the_rng():
    """A DataLoader draws a base seed from torch's RNG when iterated: the check puts it back (dropout streams unchanged)."""
    torch.manual_seed(0)
    base = TinySeq2Seq(dropout=0.3)
    a = make(clone(base))
    a.fit(DATA, 2, batch_size=4, eval_data=DataLoader(TensorDataset(*VAL), batch_size=3, shuffle=True))
    b = make(clone(base))  # seeds torch's global RNG again, as a did
    b.fit(DATA, 2, batch_size=4)
    assert a.history.losses == b.history.losses
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


@pytest.mark.parametrize("empty", [(torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, 6, dtype=torch.long)), TensorDataset(torch.zeros(0, 5))])
def test_empty_evaluation_data_speaks_of_eval_data(empty):
    t = make()
    with pytest.raises(ValueError, match="eval_data is empty: there is nothing to evaluate on") as e:
        t.fit(DATA, 1, batch_size=4, eval_data=empty)
    assert "train" not in str(e.value) and t.global_step == 0


class OnePass(IterableDataset):
    """Pairs that can be read once: ``__iter__`` starts a new generator, but over the same exhausted items."""

    def __init__(self, src, tgt):
        self.items = iter(list(zip(src, tgt)))

    def __iter__(self):
        yield from self.items


class SameIterator(IterableDataset):
    def __init__(self, src, tgt):
        self.items = iter(list(zip(src, tgt)))

    def __iter__(self):
        return self.items


def test_an_iterable_that_returns_the_same_iterator_is_refused_before_the_first_step():
    t = make()
    with pytest.raises(ValueError, match=r"eval_data is a single-pass iterable .*Pass eval_data as \(src, tgt\) tensors"):
        t.fit(DATA, 2, batch_size=4, eval_data=SameIterator(*VAL))
    assert t.global_step == 0


def test_an_evaluation_of_no_token_is_an_error_and_never_best(tmp_path):
    """A single-pass eval set used to score 3.279, then 0.0 forever, and keep_best marked epoch 2 best."""
    t = make()
    with pytest.raises(ValueError, match=r"eval_data gave no samples this time.*A single-pass iterable.*starts over each time"):
        t.fit(DATA, 3, batch_size=4, eval_data=OnePass(*VAL), keep_best="eval_loss", checkpoint_dir=tmp_path)
    assert len(t.history) == 1 and t.history[0].eval["samples"] == 6
    assert t.history.best.epoch == 1 and t.history.best.value == t.history[0].eval["loss"] > 0


def test_evaluate_refuses_targets_of_padding_only():
    src, tgt = ragged_pairs(n=4)
    tgt[:, 1:] = 0
    with pytest.raises(ValueError, match="data gave 4 samples whose targets are all padding"):
        make().evaluate((src, tgt))


# ---------------------------------------------------------------------------- the pad id
def padded_with_one():
    src, tgt = ragged_pairs(n=8)
    return src.masked_fill(src == 0, 1), tgt.masked_fill(tgt == 0, 1)  # 1 pads; real ids are >= 2


def small(pad_id):
    torch.manual_seed(0)
    return Seq2SeqTransformer(vocab_size=23, d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1, n_decoder_layers=1, max_length=16, pad_id=pad_id)


def test_the_pad_id_is_read_from_the_model():
    """It used to stay 0: the loss trained the model's padding (id 1) as a target."""
    src, tgt = padded_with_one()
    t = make(small(pad_id=1))
    assert t.pad_id == 1
    assert t.evaluate((src, tgt))["tokens"] == int((tgt[:, 1:] != 1).sum())
    assert make(small(pad_id=1), pad_id=1).pad_id == 1  # the same id, given: fine
    assert make(TinySeq2Seq()).pad_id == 0  # a model without pad_id: 0


def test_a_pad_id_other_than_the_models_is_refused():
    with pytest.raises(ValueError, match=r"pad_id=0 but the model pads with 1 \(model.pad_id\).*Leave pad_id out"):
        make(small(pad_id=1), pad_id=0)
