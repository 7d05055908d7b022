"""TrimPadding and verify_trim: cutting all-padding columns changes nothing for a model that masks padding."""

from __future__ import annotations

import collections

import pytest
import torch
from conftest import TinySeq2Seq, clone, max_rel_diff, ragged_pairs
from torch import nn

from hlbd_fast import DeferredLossSync, FastTrainer, GradientAccumulation, Strategy
from hlbd_fast.strategies.data import DataLoaderWorkers, DevicePreload
from hlbd_fast.strategies.padding import TrimCheck, TrimPadding, row_lengths, verify_trim


def padded_pairs(n: int = 42, extra: int = 14, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged pairs (sources <= 10, targets <= 12 tokens) padded with ``extra`` more columns, like HLBD's 64."""
    src, tgt = ragged_pairs(n=n, seed=seed)
    z = torch.zeros(n, extra, dtype=torch.long)
    return torch.cat([src, z], 1), torch.cat([tgt, z], 1)


def reference_model() -> nn.Module:
    from hlbd_fast.models import Seq2SeqTransformer

    torch.manual_seed(0)
    return Seq2SeqTransformer(vocab_size=23, d_model=16, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=32, dropout=0.0, max_length=32, pad_id=0)


class PoolsOverPadding(nn.Module):
    """Mean-pools the source over ALL positions, padding included: trimming changes its output."""

    def __init__(self, vocab_size: int = 23, d: int = 16) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.emb = nn.Embedding(vocab_size, d)
        self.rnn = nn.GRU(d, d, batch_first=True)
        self.out = nn.Linear(d, vocab_size)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        ctx = self.emb(src).mean(1)
        h, _ = self.rnn(self.emb(tgt_in), ctx.unsqueeze(0).contiguous())
        return self.out(h)


class Shapes(Strategy):
    """Records the (src, tgt) widths of every micro-batch after the strategies before it."""

    def __init__(self) -> None:
        self.widths: list[tuple[int, int]] = []

    def prepare_batch(self, trainer, batch):
        self.widths.append((batch[0].shape[1], batch[1].shape[1]))
        return batch


# ---------------------------------------------------------------------------- the cut
def test_keep_length_rounding_minimums_and_caps():
    t = TrimPadding(multiple_of=8)
    assert [t.keep_length(n, 64) for n in (0, 1, 7, 8, 9, 63, 64)] == [8, 8, 8, 8, 16, 64, 64]
    assert t.keep_length(0, 64, minimum=2) == 8
    assert t.keep_length(3, 5) == 5  # never above the input length
    one = TrimPadding(multiple_of=1)
    assert one.keep_length(0, 64, minimum=2) == 2 and one.keep_length(0, 64, minimum=1) == 1
    b = TrimPadding(buckets=(16, 32, 48))
    assert [b.keep_length(n, 64) for n in (1, 16, 17, 33, 48, 49, 60)] == [16, 16, 32, 48, 48, 64, 64]
    assert b.keep_length(20, 24) == 24  # bucket 32 is above the input length: keep the input


def test_prepare_batch_cuts_only_all_padding_columns_and_keeps_the_batch_type():
    src, tgt = padded_pairs(n=6)
    t = TrimPadding(multiple_of=1)
    trainer = FastTrainer(TinySeq2Seq(), progress=False)
    t.setup(trainer)
    ls, lt = int(row_lengths(src, 0).max()), int(row_lengths(tgt, 0).max())
    assert ls < src.shape[1] and lt < tgt.shape[1]
    s, tt = t.prepare_batch(trainer, (src, tgt))
    assert s.shape == (6, ls) and tt.shape == (6, lt)
    assert torch.equal(s, src[:, :ls]) and torch.equal(tt, tgt[:, :lt])
    assert (src[:, ls:] == 0).all() and (tgt[:, lt:] == 0).all()
    # lists, namedtuples and extra items survive
    Pair = collections.namedtuple("Pair", "src tgt weight")
    out = t.prepare_batch(trainer, Pair(src, tgt, 3))
    assert isinstance(out, Pair) and out.weight == 3 and out.src.shape[1] == ls
    out = t.prepare_batch(trainer, [src, tgt, "x"])
    assert isinstance(out, list) and out[2] == "x" and out[1].shape[1] == lt
    # nothing to cut: the very same batch comes back
    full = (src[:, :ls], tgt[:, :lt])
    assert t.prepare_batch(trainer, full) is full
    with pytest.raises(TypeError, match="TrimPadding needs batches"):
        t.prepare_batch(trainer, {"src": src, "tgt": tgt})


# ---------------------------------------------------------------------------- verify_trim
@pytest.mark.parametrize("make", [TinySeq2Seq, reference_model], ids=["tiny", "reference"])
def test_verify_trim_accepts_models_that_mask_padding(make):
    torch.manual_seed(0)
    model = make()
    batch = padded_pairs(n=8)
    result = verify_trim(model, batch)
    assert isinstance(result, TrimCheck)
    assert result.src_columns_cut > 0 and result.tgt_columns_cut > 0
    assert result.max_logit_diff < 1e-5 and result.loss_diff < 1e-5
    assert model.training  # the mode is restored
    model.eval()
    verify_trim(model, batch)
    assert not model.training


def test_verify_trim_refuses_a_model_that_pools_over_padding():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="lets padding influence real positions.*TrimPadding would change its results"):
        verify_trim(PoolsOverPadding(), padded_pairs(n=8))


def test_verify_trim_checks_an_fp32_copy_of_a_low_precision_model():
    torch.manual_seed(0)
    model = TinySeq2Seq().to(torch.bfloat16)
    result = verify_trim(model, padded_pairs(n=8))
    assert result.columns_cut > 0
    assert next(model.parameters()).dtype == torch.bfloat16  # the model itself is untouched


def test_verify_trim_bad_arguments():
    model, batch = TinySeq2Seq(), padded_pairs(n=4)
    with pytest.raises(ValueError, match="tol"):
        verify_trim(model, batch, tol=0)
    with pytest.raises(ValueError, match="pad_id"):
        verify_trim(model, batch, pad_id=0.5)
    with pytest.raises(TypeError, match="nn.Module"):
        verify_trim(lambda s, t: s, batch)
    with pytest.raises(TypeError, match="verify_trim needs batches"):
        verify_trim(model, batch[0])


def test_check_true_refuses_a_model_that_is_not_trim_exact():
    torch.manual_seed(0)
    trainer = FastTrainer(PoolsOverPadding(), strategies=[TrimPadding(check=True)], seed=0, progress=False)
    with pytest.raises(ValueError, match="TrimPadding refused.*lets padding reach real positions. The fix is in the model.*check=False"):
        trainer.fit(padded_pairs(), 1, batch_size=4)


def test_check_true_runs_once_on_a_batch_with_padding_to_cut(monkeypatch):
    import hlbd_fast.strategies.padding as padding

    calls = []
    real = padding.verify_trim
    monkeypatch.setattr(padding, "verify_trim", lambda *a, **k: calls.append(1) or real(*a, **k))
    src, tgt = padded_pairs()
    data = (src[:, :10], tgt[:, :12])  # the first batch may have nothing to cut at all
    FastTrainer(TinySeq2Seq(), strategies=[TrimPadding(check=True)], seed=0, progress=False).fit(data, 2, batch_size=4)
    assert 1 <= len(calls) <= 3


# ---------------------------------------------------------------------------- the proof runs without TF32
def tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def tf32_on():
    """TF32 on, as AllowTF32's run scope (or set_float32_matmul_precision('high')) leaves it; the flags as they were after."""
    saved = tf32_flags()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class SeesTF32(TinySeq2Seq):
    """Records the TF32 flags in force at every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, src, tgt_in):
        self.seen.append(tf32_flags())
        return super().forward(src, tgt_in)


class PoolsAndSeesTF32(PoolsOverPadding):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, src, tgt_in):
        self.seen.append(tf32_flags())
        return super().forward(src, tgt_in)


def test_the_proof_runs_with_tf32_off_and_restores_it(tf32_on):
    """Under TF32 the padded and trimmed forwards round differently: the proof compares them in fp32."""
    torch.manual_seed(0)
    model = SeesTF32()
    verify_trim(model, padded_pairs(n=8))
    assert model.seen == [(False, False)] * 2 and tf32_flags() == (True, True)
    refused = PoolsAndSeesTF32()
    with pytest.raises(ValueError, match="lets padding influence real positions"):
        verify_trim(refused, padded_pairs(n=8))
    assert refused.seen == [(False, False)] * 2 and tf32_flags() == (True, True)  # restored on the error too


def test_the_trainers_proof_runs_without_tf32_and_training_with_it(tf32_on):
    torch.manual_seed(0)
    model = SeesTF32()
    FastTrainer(model, strategies=[TrimPadding()], seed=0, progress=False).fit(padded_pairs(n=8), 1, batch_size=4)
    assert model.seen[:2] == [(False, False)] * 2  # the proof, on the first batch
    assert model.seen[2:] == [(True, True)] * 2  # the two training forwards: as the run set them


# ---------------------------------------------------------------------------- parity with the untrimmed loop
PARITY = {
    "plain": lambda: [TrimPadding(multiple_of=1)],
    "multiple_of_8": lambda: [TrimPadding()],
    "buckets": lambda: [TrimPadding(buckets=(4, 8, 16))],
    "accumulation": lambda: [GradientAccumulation(3), TrimPadding(multiple_of=1)],
    "gpu_preload": lambda: [DevicePreload(), TrimPadding(multiple_of=2), DeferredLossSync()],
    "gpu_preload_pad": lambda: [DevicePreload(last_batch="pad"), TrimPadding(buckets=(8, 16, 32))],
    "workers": lambda: [DataLoaderWorkers(num_workers=1), TrimPadding(multiple_of=4)],
}


@pytest.mark.parametrize("name", sorted(PARITY))
def test_trimmed_training_equals_untrimmed_training(name):
    """CPU, fp32, dropout off: same weights (1e-5 relative) and losses, on batches that really were cut."""
    strategies = PARITY[name]()
    src, tgt = padded_pairs()
    torch.manual_seed(0)
    base = TinySeq2Seq()
    ref, ours = clone(base), clone(base)
    h_ref = FastTrainer(ref, strategies=_untrimmed(strategies), seed=4, progress=False, lr=1e-3).fit((src, tgt), 3, batch_size=4)
    shapes = Shapes()
    h = FastTrainer(ours, strategies=strategies + [shapes], seed=4, progress=False, lr=1e-3).fit((src, tgt), 3, batch_size=4)
    assert max(w for w, _ in shapes.widths) < src.shape[1] and max(w for _, w in shapes.widths) < tgt.shape[1]
    assert max_rel_diff(ref, ours) < 1e-5
    assert h.losses == pytest.approx(h_ref.losses, rel=1e-5)
    assert [r.tokens for r in h] == [r.tokens for r in h_ref]
    assert max_rel_diff(ours, base) > 1e-3  # training moved the weights


def _untrimmed(strategies):
    """Fresh copies of the strategies that change the batches or steps (not the trimming)."""
    out = []
    for s in strategies:
        if isinstance(s, GradientAccumulation):
            out.append(GradientAccumulation(s.steps))
        elif isinstance(s, DevicePreload):
            out.append(DevicePreload(last_batch=s.last_batch))
    return out


def test_trimmed_training_of_the_reference_model_equals_untrimmed():
    """The reference transformer, trained with SGD: trimmed and untrimmed gradients agree.

    SGD, because Adam divides each gradient by its own running magnitude: attention's key
    biases get a zero gradient in exact arithmetic (softmax ignores a shift shared by all
    keys), so any change of rounding, trimming or not, turns their noise into full Adam
    steps in opposite directions. The losses agree under either optimizer.
    """
    src, tgt = padded_pairs()
    base = reference_model()
    ref, ours = clone(base), clone(base)
    t_ref = FastTrainer(ref, optimizer=torch.optim.SGD(ref.parameters(), lr=0.5), strategies=[GradientAccumulation(2)], seed=2, progress=False)
    t = FastTrainer(
        ours,
        optimizer=torch.optim.SGD(ours.parameters(), lr=0.5),
        strategies=[GradientAccumulation(2), DevicePreload(), TrimPadding(multiple_of=1, check=True)],
        seed=2,
        progress=False,
    )
    h_ref, h = t_ref.fit((src, tgt), 2, batch_size=4), t.fit((src, tgt), 2, batch_size=4)
    assert max_rel_diff(ref, ours) < 1e-5
    assert h.losses == pytest.approx(h_ref.losses, rel=1e-5)
    assert max_rel_diff(ours, base) > 1e-3


@pytest.mark.parametrize("last_batch", ["keep", "pad", "drop"])
def test_with_gpu_preload_the_cut_needs_no_read_back(monkeypatch, last_batch):
    """Every batch's lengths come from DevicePreload's host-side lengths: the sync path is never taken."""

    def no_sync(self, src, tgt):
        raise AssertionError("TrimPadding read lengths back from the batch")

    monkeypatch.setattr(TrimPadding, "_device_lengths", no_sync)
    shapes = Shapes()
    h = FastTrainer(TinySeq2Seq(), strategies=[DevicePreload(last_batch=last_batch), TrimPadding(multiple_of=1), shapes], seed=1, progress=False).fit(
        padded_pairs(), 2, batch_size=4
    )
    assert len(h) == 2 and max(w for w, _ in shapes.widths) <= 10


def test_without_a_length_provider_the_lengths_are_read_from_the_batch():
    src, tgt = padded_pairs()
    shapes = Shapes()
    FastTrainer(TinySeq2Seq(), strategies=[TrimPadding(multiple_of=1), shapes], seed=1, progress=False).fit((src, tgt), 1, batch_size=4)
    trainer = FastTrainer(TinySeq2Seq(), seed=1, progress=False)
    expected = [(int(row_lengths(s, 0).max()), max(2, int(row_lengths(t, 0).max()))) for s, t in trainer.host_batches(trainer.make_source((src, tgt), 4), 0)]
    assert shapes.widths == expected


# ---------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"multiple_of": 0}, "multiple_of must be an integer >= 1"),
        ({"multiple_of": -8}, "multiple_of must be an integer >= 1"),
        ({"multiple_of": 2.5}, "multiple_of must be an integer >= 1"),
        ({"multiple_of": True}, "multiple_of must be an integer >= 1"),
        ({"buckets": ()}, "non-empty sequence"),
        ({"buckets": "16,32"}, "non-empty sequence"),
        ({"buckets": 16}, "non-empty sequence"),
        ({"buckets": (32, 16)}, "strictly increasing"),
        ({"buckets": (16, 16)}, "strictly increasing"),
        ({"buckets": (0, 16)}, "integer >= 1"),
        ({"buckets": (8, 16.0)}, "integer >= 1"),
        ({"check": "yes"}, "check must be True or False"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrimPadding(**kwargs)


def test_presets_never_trim_a_model_that_lets_padding_leak():
    """fastest on a model that pools over padding: TrimPadding leaves itself out with one warning, and the run
    trains exactly what fastest without TrimPadding trains, from the same weights."""
    from hlbd_fast import presets

    torch.manual_seed(0)
    base = PoolsOverPadding()
    a, b = clone(base), clone(base)
    with pytest.warns(
        RuntimeWarning,
        match=r"TrimPadding is left out of this run: its proof failed.*logits at real target positions by .*Fixed, it would buy: a forward of this batch cut .* ms padded \(\d+\.\dx cheaper\).*mask padding keys",
    ):
        trainer = FastTrainer.from_preset(a, "fastest", device="cpu", progress=False, seed=3)
        ha = trainer.fit(padded_pairs(), 2, batch_size=8)
    hb = FastTrainer.from_preset(b, presets.fastest("cpu").without(TrimPadding), device="cpu", progress=False, seed=3).fit(padded_pairs(), 2, batch_size=8)
    assert ha.losses == hb.losses and all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert list(ha.left_out) == ["TrimPadding"] and "proof failed" in ha.left_out["TrimPadding"]
    # listed by hand it keeps raising, the model fix first and check=False last
    with pytest.raises(ValueError, match=r"TrimPadding refused this model.*The fix is in the model: mask padding keys.*check=False\) skips the proof"):
        FastTrainer(PoolsOverPadding(), strategies=[TrimPadding()], progress=False).fit(padded_pairs(), 1, batch_size=8)
    assert TrimPadding().check is True  # the proof is on unless a user turns it off
    FastTrainer(PoolsOverPadding(), strategies=[TrimPadding(check=False)], progress=False).fit(padded_pairs(), 1, batch_size=8)
