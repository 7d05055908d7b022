"""DevicePreload and DataLoaderWorkers: the plain loop's batches, in the plain loop's order."""

from __future__ import annotations

import gc
import multiprocessing
import warnings
import weakref

import pytest
import torch
from conftest import TinySeq2Seq, clone, max_rel_diff, ragged_pairs
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from hlbd_fast import DeferredLossSync, FastTrainer, GradientAccumulation, Strategy, StrategyConflictError
from hlbd_fast.batches import KnownLengths
from hlbd_fast.packing import packed_sizes
from hlbd_fast.strategies.data import DataLoaderWorkers, DevicePreload
from hlbd_fast.strategies.padding import row_lengths


class Pairs(Dataset):
    """A map-style dataset of (src, tgt) rows that counts its reads."""

    def __init__(self, src: torch.Tensor, tgt: torch.Tensor, tokenizer=None) -> None:
        self.src, self.tgt = src, tgt
        self.reads = 0
        if tokenizer is not None:
            self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int):
        self.reads += 1
        return self.src[i], self.tgt[i]


class Tok:
    """A stand-in tokenizer; ``is_frozen`` set per test."""


def tok(**attrs):
    t = Tok()
    for k, v in attrs.items():
        setattr(t, k, v)
    return t


def dropout_model() -> TinySeq2Seq:
    torch.manual_seed(0)
    return TinySeq2Seq(dropout=0.3)


def fit_pair(data, strategies, plain_data=None, epochs=2, batch_size=4, accumulation=2, plain_batch_size=None):
    """Train the plain loop and the loop with ``strategies`` from the same weights, seed and global RNG."""
    base = dropout_model()
    ref, ours = clone(base), clone(base)
    torch.manual_seed(11)
    h_ref = FastTrainer(ref, strategies=[GradientAccumulation(accumulation)], seed=5, progress=False, lr=1e-3).fit(
        data if plain_data is None else plain_data, epochs, batch_size=plain_batch_size or batch_size
    )
    torch.manual_seed(11)
    h = FastTrainer(ours, strategies=[GradientAccumulation(accumulation), *strategies], seed=5, progress=False, lr=1e-3).fit(
        data, epochs, batch_size=batch_size
    )
    return ref, ours, h_ref, h


def assert_identical(ref, ours, h_ref, h):
    assert h.losses == h_ref.losses
    assert [r.micro_batches for r in h] == [r.micro_batches for r in h_ref]
    for p, q in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------------- DevicePreload: same as the plain loop
def test_gpu_preload_tensors_trains_exactly_like_the_plain_loop():
    """42 pairs, batch 4 (a last batch of 2), accumulation 2, dropout on: bit-identical losses and weights."""
    ref, ours, h_ref, h = fit_pair(ragged_pairs(n=42), [DevicePreload(), DeferredLossSync()])
    assert_identical(ref, ours, h_ref, h)
    assert [r.micro_batches for r in h] == [11, 11]


def test_gpu_preload_dataset_trains_exactly_like_the_plain_loop():
    src, tgt = ragged_pairs(n=42)
    ds = Pairs(src, tgt)
    ref, ours, h_ref, h = fit_pair(ds, [DevicePreload()])
    assert_identical(ref, ours, h_ref, h)


def test_gpu_preload_pair_dataset_and_reference_model_train_exactly_like_the_plain_loop():
    """The real pieces: a PairDataset encoded with a frozen CharTokenizer, the reference transformer, dropout on."""
    from hlbd_fast.data import CharTokenizer, PairDataset, load_hlbd
    from hlbd_fast.models import Seq2SeqTransformer

    pairs = load_hlbd()[:30]
    tokenizer = CharTokenizer.from_pairs(pairs)
    ds = PairDataset(pairs, tokenizer, max_length=24)
    torch.manual_seed(0)
    base = Seq2SeqTransformer(
        vocab_size=tokenizer.vocab_size, d_model=16, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=32, dropout=0.1, max_length=24
    )
    ref, ours = clone(base), clone(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation notices of the tokenizer
        h_ref = FastTrainer(ref, seed=3, progress=False, lr=1e-3).fit(ds, 2, batch_size=8)
        h = FastTrainer(ours, strategies=[DevicePreload(), DeferredLossSync()], seed=3, progress=False, lr=1e-3).fit(ds, 2, batch_size=8)
    assert_identical(ref, ours, h_ref, h)


def test_gpu_preload_dataloader_uses_its_dataset_and_batch_size():
    """Given a DataLoader: its dataset and batch size, the trainer's order (a warning says so)."""
    src, tgt = ragged_pairs(n=42)
    ds = Pairs(src, tgt)
    loader = DataLoader(ds, batch_size=4, shuffle=True)
    with pytest.warns(UserWarning, match="order from trainer.epoch_order.*shuffle=True"):
        ref, ours, h_ref, h = fit_pair(loader, [DevicePreload()], plain_data=ds, batch_size=7, plain_batch_size=4)
    assert_identical(ref, ours, h_ref, h)


def test_gpu_preload_yields_the_plain_loops_batches():
    src, tgt = ragged_pairs(n=10)
    trainer = FastTrainer(TinySeq2Seq(), seed=9, progress=False)
    source = trainer.make_source((src, tgt), 4)
    for epoch in range(2):
        plain = list(trainer.host_batches(source, epoch))
        ours = list(DevicePreload().batches(trainer, source, epoch))
        assert len(plain) == len(ours) == 3
        for (a, b), (c, d) in zip(plain, ours):
            assert torch.equal(a, c) and torch.equal(b, d)
    # shuffle=False keeps the data order
    ours = list(DevicePreload().batches(trainer, trainer.make_source((src, tgt), 4, shuffle=False), 0))
    assert torch.equal(ours[0][0], src[:4]) and torch.equal(ours[2][1], tgt[8:])


def test_gpu_preload_drop_and_pad():
    src, tgt = ragged_pairs(n=10)
    trainer = FastTrainer(TinySeq2Seq(), seed=9, progress=False)
    source = trainer.make_source((src, tgt), 4)
    keep = list(DevicePreload().batches(trainer, source, 1))
    drop = list(DevicePreload(last_batch="drop").batches(trainer, source, 1))
    assert len(drop) == 2 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(drop, keep))
    pad = list(DevicePreload(last_batch="pad").batches(trainer, source, 1))
    assert [b[0].shape[0] for b in pad] == [4, 4, 4]
    s, t = pad[2]
    real_s, real_t = keep[2]
    assert torch.equal(s[:2], real_s) and torch.equal(t[:2], real_t)
    order = trainer.epoch_order(10, 1)
    assert torch.equal(s[2:], src[order[:2]])  # pad rows repeat the epoch's first sources
    assert torch.equal(t[2:, 0], tgt[order[:2], 0]) and (t[2:, 1:] == 0).all()  # BOS, then nothing to predict
    assert trainer.count_tokens((s, t)) == trainer.count_tokens(keep[2])


@pytest.mark.parametrize("normalization", ["tokens", "micro_batch"])
def test_gpu_preload_pad_trains_like_keep(normalization):
    """Pad rows add nothing: losses and token counts as with "keep" (dropout off: same up to rounding)."""
    torch.manual_seed(0)
    base = TinySeq2Seq()
    a, b = clone(base), clone(base)
    kw = dict(seed=3, progress=False, lr=1e-3, loss_normalization=normalization)
    ha = FastTrainer(a, strategies=[DevicePreload()], **kw).fit(ragged_pairs(n=42), 2, batch_size=4)
    hb = FastTrainer(b, strategies=[DevicePreload(last_batch="pad")], **kw).fit(ragged_pairs(n=42), 2, batch_size=4)
    assert hb.losses == pytest.approx(ha.losses, rel=1e-6)
    assert [r.tokens for r in hb] == [r.tokens for r in ha]
    assert max_rel_diff(a, b) < 1e-5


def test_gpu_preload_pad_rows_keep_the_reference_model_finite():
    from hlbd_fast.models import Seq2SeqTransformer

    torch.manual_seed(0)
    model = Seq2SeqTransformer(vocab_size=23, d_model=16, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=32, dropout=0.1, max_length=16)
    h = FastTrainer(model, strategies=[DevicePreload(last_batch="pad")], seed=0, progress=False).fit(ragged_pairs(n=10), 2, batch_size=4)
    assert all(torch.isfinite(torch.tensor(h.losses)))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_gpu_preload_host_lengths():
    """Each batch's longest rows, and what a padding-free packing of it keeps, are known on the host
    (trainer.known_lengths) for the very tensors yielded (pad rows included: they score nothing)."""
    src, tgt = ragged_pairs(n=10)
    trainer = FastTrainer(TinySeq2Seq(), seed=2, progress=False)
    source = trainer.make_source((src, tgt), 4)
    known = trainer.known_lengths
    for last_batch in ("keep", "pad"):
        g = DevicePreload(last_batch=last_batch)
        for s, t in g.batches(trainer, source, 0):
            assert known.lookup((s, t)) == (int(row_lengths(s, 0).max()), int(row_lengths(t, 0).max()))
            assert known.packed((s, t)) == tuple(int(n.sum()) for n in packed_sizes(s, t, 0))
            assert known.lookup((s.clone(), t)) is None  # not the batch it yielded
            assert known.lookup(s) is None


def test_known_lengths_answer_for_every_batch_in_hand_unchanged():
    """Accumulation holds a step's batches at once: each is answered; a batch changed in place, or another, is not;
    a cut of only padding columns carries the lengths on; the tensors are not kept alive."""
    known = KnownLengths()

    def batch():
        return torch.ones(2, 5, dtype=torch.long), torch.ones(2, 6, dtype=torch.long)

    a, b = batch(), batch()
    known.remember(*a, 3, 4, packed=(6, 5))
    known.remember(*b, 2, 3)
    assert known.lookup(a) == (3, 4) and known.packed(a) == (6, 5)
    assert known.lookup(b) == (2, 3) and known.packed(b) is None
    assert known.lookup((a[0], b[1])) is None and known.lookup([a[0].clone(), a[1]]) is None
    cut = (a[0][:, :3], a[1][:, :4])
    known.carry(a, *cut)
    assert known.lookup(cut) == (3, 4) and known.packed(cut) == (6, 5)
    a[1][0, 0] = 7  # changed in place: the host's lengths may be wrong now
    assert known.lookup(a) is None and known.packed(cut) is None
    gone = weakref.ref(b[0])
    del b
    gc.collect()
    assert gone() is None
    known.forget()
    assert known.lookup(cut) is None


def test_gpu_preload_reads_data_once_and_again_after_in_place_changes():
    src, tgt = ragged_pairs(n=12)
    ds = Pairs(src, tgt)
    g = DevicePreload()
    trainer = FastTrainer(TinySeq2Seq(), strategies=[g], seed=1, progress=False)
    trainer.fit(ds, 2, batch_size=4)
    trainer.fit(ds, 3, batch_size=4)
    assert ds.reads == 12
    assert g.loads == 1
    trainer.fit((src, tgt), 4, batch_size=4)
    trainer.fit((src, tgt), 5, batch_size=4)
    assert g.loads == 2  # the tensors: read once
    tgt[0, 1] = 5  # an in-place change of the same tensor
    trainer.fit((src, tgt), 6, batch_size=4)
    assert g.loads == 3 and torch.equal(g.preloaded[1], tgt)


def test_gpu_preload_reuses_the_data_of_a_new_loader_over_the_same_dataset():
    """The original loop's habit: a new DataLoader every epoch. The dataset is read (and the warning given) once."""
    src, tgt = ragged_pairs(n=12)
    ds = Pairs(src, tgt)
    trainer = FastTrainer(TinySeq2Seq(), strategies=[DevicePreload()], seed=1, progress=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            trainer.train_epoch(DataLoader(ds, batch_size=4, shuffle=True))
    assert ds.reads == 12
    assert sum("DevicePreload reads the DataLoader" in str(w.message) for w in record) == 1


# ---------------------------------------------------------------------------- DevicePreload: bad inputs
class Stream(IterableDataset):
    def __iter__(self):
        yield from zip(*ragged_pairs(n=4))


class Ragged(Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return torch.ones(2 + i, dtype=torch.long), torch.full((3,), 2)


class Triples(Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return torch.ones(2, dtype=torch.long), torch.full((3,), 2), 1


@pytest.mark.parametrize(
    "data, match",
    [
        (DataLoader(Stream(), batch_size=2), "needs tensors or a map-style Dataset"),
        (Ragged(), "could not stack.*pad them in the Dataset"),
        (Triples(), r"\(src, tgt\) pairs.*3 items"),
        (Pairs(torch.full((4, 3), 99), torch.full((4, 3), 2)), "token id 99.*vocabulary"),
    ],
)
def test_gpu_preload_refuses_data_it_cannot_preload(data, match):
    trainer = FastTrainer(TinySeq2Seq(), strategies=[DevicePreload()], progress=False)
    with pytest.raises((ValueError, TypeError), match=match):
        trainer.fit(data, 1, batch_size=2)


def test_gpu_preload_bad_arguments():
    with pytest.raises(ValueError, match="last_batch='bogus'.*'keep', 'drop', 'pad'"):
        DevicePreload(last_batch="bogus")
    trainer = FastTrainer(TinySeq2Seq(), strategies=[DevicePreload(last_batch="drop")], progress=False)
    with pytest.raises(ValueError, match="fewer than batch_size=8.*last_batch='keep'"):
        trainer.fit(ragged_pairs(n=5), 1, batch_size=8)
    loader = DataLoader(Pairs(*ragged_pairs(n=8)), batch_sampler=[[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="batch_sampler"):
        FastTrainer(TinySeq2Seq(), strategies=[DevicePreload()], progress=False).fit(loader, 1)
    with pytest.raises(StrategyConflictError, match="DevicePreload.*DataLoaderWorkers.*'batches'"):
        FastTrainer(TinySeq2Seq(), strategies=[DevicePreload(), DataLoaderWorkers()], progress=False)


# ---------------------------------------------------------------------------- DataLoaderWorkers
@pytest.mark.parametrize("as_dataset", [False, True], ids=["tensors", "dataset"])
def test_workers_train_exactly_like_the_plain_loop(as_dataset):
    """Two persistent workers, 3 epochs, dropout on: bit-identical losses and weights."""
    src, tgt = ragged_pairs(n=42)
    data = Pairs(src, tgt, tokenizer=tok(is_frozen=True)) if as_dataset else (src, tgt)
    w = DataLoaderWorkers(num_workers=2)
    ref, ours, h_ref, h = fit_pair(data, [w], epochs=3)
    assert_identical(ref, ours, h_ref, h)
    assert w.workers_running  # kept for the next fit on the same data
    w.close()
    assert not w.workers_running


def test_workers_serve_several_epochs_with_one_loader():
    src, tgt = ragged_pairs(n=12)
    w = DataLoaderWorkers(num_workers=1)
    trainer = FastTrainer(TinySeq2Seq(), strategies=[w], seed=3, progress=False)
    source = trainer.make_source((src, tgt), 4)
    first = list(w.batches(trainer, source, 0))
    second = list(w.batches(trainer, source, 1))
    for epoch, got in ((0, first), (1, second)):
        for (a, b), (c, d) in zip(trainer.host_batches(source, epoch), got):
            assert torch.equal(a, c) and torch.equal(b, d)
    assert w.workers_running
    w.close()
    assert not w.workers_running


def test_workers_are_reused_by_the_next_fit_and_stopped_by_an_error():
    """One worker pool serves every fit on the same data; a run that fails stops it."""
    src, tgt = ragged_pairs(n=12)
    w = DataLoaderWorkers(num_workers=1)
    trainer = FastTrainer(TinySeq2Seq(), strategies=[w], seed=3, progress=False)
    pids = []

    class WorkerPids(Strategy):
        def on_step_end(self, trainer):
            pids.append(frozenset(p.pid for p in multiprocessing.active_children()))

    spy = FastTrainer(TinySeq2Seq(), strategies=[DataLoaderWorkers(num_workers=1), WorkerPids()], seed=3, progress=False)
    spy.fit((src, tgt), 1, batch_size=4)
    spy.fit((src, tgt), 2, batch_size=4)
    assert len(set(pids)) == 1 and pids[0]  # the same worker process in both fits
    spy.close()  # stops the worker processes
    assert not any(p.pid in pids[0] for p in multiprocessing.active_children())
    trainer.close()  # w may serve another trainer now

    class Boom(Strategy):
        def on_step_end(self, trainer):
            raise RuntimeError("boom")

    failing = FastTrainer(TinySeq2Seq(), strategies=[w, Boom()], seed=3, progress=False)
    with pytest.raises(RuntimeError, match="boom"):
        failing.fit((src, tgt), 1, batch_size=4)
    assert not w.workers_running


def test_workers_refuse_a_tokenizer_that_can_grow():
    src, tgt = ragged_pairs(n=8)
    trainer = FastTrainer(TinySeq2Seq(), strategies=[DataLoaderWorkers(num_workers=2)], progress=False)
    with pytest.raises(ValueError, match="can still grow its vocabulary.*CharTokenizer.from_texts"):
        trainer.fit(Pairs(src, tgt, tokenizer=tok(is_frozen=False)), 1)
    with pytest.raises(ValueError, match="can still grow"):  # also inside a Subset
        trainer.fit(Subset(Pairs(src, tgt, tokenizer=tok(is_frozen=False)), [0, 1, 2]), 1)
    # without processes there is nothing to diverge
    FastTrainer(TinySeq2Seq(), strategies=[DataLoaderWorkers(num_workers=0)], progress=False).fit(Pairs(src, tgt, tokenizer=tok(is_frozen=False)), 1)


def test_workers_warn_about_a_tokenizer_they_cannot_judge():
    src, tgt = ragged_pairs(n=8)
    trainer = FastTrainer(TinySeq2Seq(), strategies=[DataLoaderWorkers(num_workers=1)], progress=False)
    with pytest.warns(UserWarning, match="no is_frozen attribute"):
        trainer.fit(Pairs(src, tgt, tokenizer=tok()), 1)


def test_workers_bad_inputs():
    with pytest.raises(ValueError, match="pass the Dataset"):
        FastTrainer(TinySeq2Seq(), strategies=[DataLoaderWorkers(num_workers=1)], progress=False).fit(
            DataLoader(TensorDataset(*ragged_pairs(n=8)), batch_size=4), 1
        )
    for kwargs, match in [
        ({"num_workers": -1}, "num_workers"),
        ({"num_workers": 1.5}, "num_workers"),
        ({"num_workers": True}, "num_workers"),
        ({"pin_memory": "yes"}, "pin_memory"),
        ({"persistent_workers": None}, "persistent_workers"),
    ]:
        with pytest.raises(ValueError, match=match):
            DataLoaderWorkers(**kwargs)


def test_workers_are_sized_from_the_cores_there_are(monkeypatch):
    """Four workers on two cores made 'quick' slower than the baseline: one core stays with training."""
    from hlbd_fast.strategies import data

    for cores, expected in ((1, 0), (2, 1), (3, 2), (8, 4), (64, 4)):
        monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert data.default_workers() == expected
        assert DataLoaderWorkers().num_workers == expected
    assert DataLoaderWorkers(num_workers=3).num_workers == 3  # a count given is used as it is
