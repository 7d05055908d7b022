"""FastDropout: torch's masks bit for bit (exact=True), or the same distribution from fewer draws."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import clone, ragged_pairs
from torch import nn

from hlbd_fast import Compile, DevicePreload, FastDropout, FastTrainer, GradientCheckpointing, StrategyConflictError, TrimPadding
from hlbd_fast.models import Seq2SeqTransformer
from hlbd_fast.strategies import dropout as dropout_mod
from hlbd_fast.strategies.dropout import fast_dropout, torch_draws_dropout_serially

VOCAB = 50
serial_only = pytest.mark.skipif(
    not torch_draws_dropout_serially(),
    reason="this torch draws CPU dropout masks with MKL's generator; FastDropout leaves dropout to torch here",
)


def tiny_transformer(dropout: float = 0.1, seed: int = 0) -> Seq2SeqTransformer:
    torch.manual_seed(seed)
    return Seq2SeqTransformer(vocab_size=VOCAB, d_model=32, n_encoder_layers=2, n_decoder_layers=2, n_heads=2, d_ff=64, dropout=dropout, max_length=16)


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return ragged_pairs(n=48, vocab=VOCAB)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes, so that equality means bit for bit (signed zeros included)."""
    return t.contiguous().view(-1).view(torch.uint8)


def train(model: nn.Module, data, strategies=(), epochs: int = 2, **kwargs):
    trainer = FastTrainer(model, strategies=list(strategies), seed=3, lr=2e-3, progress=False, **kwargs)
    return trainer, trainer.fit(data, epochs, batch_size=kwargs.pop("batch_size", 8))


# ---------------------------------------------------------------------------- exact masks
@serial_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "inplace"])
def test_exact_dropout_is_torch_dropout_bit_for_bit(dtype, layout):
    x = torch.randn(24, 9, 40).to(dtype)
    if layout == "transposed":
        x = x.transpose(0, 2)  # torch assigns draws in memory order; so must we
    inplace = layout == "inplace"
    state = torch.get_rng_state()
    theirs = F.dropout(x.clone(), 0.17, training=True, inplace=inplace)
    after_theirs = torch.get_rng_state()
    torch.set_rng_state(state)
    with fast_dropout(exact=True) as mode:
        mine = F.dropout(x.clone(), 0.17, training=True, inplace=inplace)
    assert mode.calls == 1  # it went through FastDropout
    assert torch.equal(bits(theirs), bits(mine))
    assert torch.equal(torch.get_rng_state(), after_theirs)  # the generator moved exactly as far
    assert 0 < int((mine == 0).sum()) < x.numel()


@serial_only
def test_exact_training_is_the_plain_loop_bit_for_bit(data):
    """Dropout on (embeddings, residuals, feed-forward, and SDPA's own dropout interleaved): same losses, same weights."""
    base = tiny_transformer(dropout=0.1)
    a, b = clone(base), clone(base)
    _, ha = train(a, data)
    tb, hb = train(b, data, [FastDropout(exact=True)])
    assert tb.strategies[0].active
    assert hb.losses == ha.losses
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.embed.weight, base.embed.weight)  # it trained


# ---------------------------------------------------------------------------- the fast stream
@serial_only
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_fast_masks_have_dropouts_distribution(p):
    x = torch.ones(1000, 1000)
    torch.manual_seed(0)
    with fast_dropout() as mode:
        y1 = F.dropout(x, p)
        y2 = F.dropout(x, p)
    assert mode.calls == 2
    q = 1 - p
    scale = torch.ones(()).div_(q)  # the value torch's dropout gives kept elements
    kept1, kept2 = y1 != 0, y2 != 0
    assert torch.equal(y1[kept1], scale.expand(int(kept1.sum())))
    n = x.numel()
    sigma = math.sqrt(q * p / n)
    assert abs(float(kept1.float().mean()) - q) < 5 * sigma
    assert abs(float(kept2.float().mean()) - q) < 5 * sigma
    # independent masks: both kept as often as q*q
    assert abs(float((kept1 & kept2).float().mean()) - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / n)
    # neighbours are independent too (each 64-bit draw feeds two elements)
    pairs = kept1.view(-1, 2)
    assert abs(float((pairs[:, 0] & pairs[:, 1]).float().mean()) - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / (n / 2))
    # unbiased: E[dropout(x)] = x
    assert abs(float(y1.mean()) - 1.0) < 5 * math.sqrt(p / q / n)


@serial_only
@pytest.mark.parametrize("exact", [False, True])
def test_masks_are_written_into_any_dtype_and_layout(exact):
    """bernoulli_ on float (dropout's noise), bf16, int, bool and transposed tensors: the same 0/1 draws."""
    masks = []
    for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.bool):
        for transposed in (False, True):
            t = torch.empty(9, 14, dtype=dtype)
            t = t.t().contiguous().t() if transposed else t  # same shape, column-major memory
            torch.manual_seed(11)
            with fast_dropout(exact=exact) as mode:
                t.bernoulli_(0.6)
            assert mode.calls == 1 and t.dtype == dtype
            masks.append((transposed, t.to(torch.bool)))
    # fast draws fill the elements in logical order, exact ones in memory order (as torch does)
    for transposed, m in masks:
        same_layout = [x for tr, x in masks if tr == transposed or not exact]
        assert all(torch.equal(m, x) for x in same_layout)
    assert 0 < int(masks[0][1].sum()) < masks[0][1].numel()


@serial_only
def test_fast_masks_follow_manual_seed_and_differ_from_torchs():
    x = torch.ones(64, 64)
    torch.manual_seed(5)
    with fast_dropout():
        a = F.dropout(x, 0.3)
    torch.manual_seed(5)
    with fast_dropout():
        b = F.dropout(x, 0.3)
    torch.manual_seed(5)
    c = F.dropout(x, 0.3)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # a different stream: this is not torch's kernel


@serial_only
def test_fast_gradient_is_the_mask_times_scale():
    x = torch.randn(32, 50, requires_grad=True)
    with fast_dropout():
        y = F.dropout(x, 0.25)
    y.sum().backward()
    noise = torch.where(y != 0, torch.ones(()).div_(0.75), torch.zeros(()))
    assert torch.equal(x.grad, noise)


@serial_only
def test_fast_training_with_dropout_off_is_the_plain_loop_exactly(data):
    base = tiny_transformer(dropout=0.0)
    a, b = clone(base), clone(base)
    _, ha = train(a, data)
    _, hb = train(b, data, [FastDropout()])
    assert hb.losses == ha.losses
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_eval_mode_draws_nothing():
    model = tiny_transformer(dropout=0.3).eval()
    src, tgt = ragged_pairs(n=4, vocab=VOCAB)
    plain = model(src, tgt[:, :-1])
    state = torch.get_rng_state()
    with fast_dropout() as mode:
        again = model(src, tgt[:, :-1])
    assert torch.equal(plain, again)
    assert torch.equal(torch.get_rng_state(), state)
    assert getattr(mode, "calls", 0) == 0


@serial_only
def test_fast_training_with_dropout_on_stays_close(data):
    """Another stream of the same masks' distribution: not the same losses, close ones (stated: 5% on this toy run)."""
    base = tiny_transformer(dropout=0.1)
    a, b = clone(base), clone(base)
    _, ha = train(a, data, epochs=4)
    _, hb = train(b, data, [FastDropout()], epochs=4)
    assert hb.losses != ha.losses  # it was active
    assert hb.losses == pytest.approx(ha.losses, rel=0.05)


@serial_only
@pytest.mark.parametrize("exact", [False, True])
def test_checkpointing_recomputes_the_same_masks(data, exact):
    """The masks are drawn again when checkpointed layers recompute in backward: they must be the same ones."""
    base = tiny_transformer(dropout=0.2)
    a, b = clone(base), clone(base)
    _, ha = train(a, data, [FastDropout(exact=exact)])
    _, hb = train(b, data, [FastDropout(exact=exact), GradientCheckpointing()])
    assert hb.losses == pytest.approx(ha.losses, rel=1e-6)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-6), n


@serial_only
def test_resume_replays_the_same_masks(data, tmp_path):
    base = tiny_transformer(dropout=0.2)
    a, b = clone(base), clone(base)
    _, ha = train(a, data, [FastDropout()], epochs=3)
    tb = FastTrainer(b, strategies=[FastDropout()], seed=3, lr=2e-3, progress=False)
    tb.fit(data, 1, batch_size=8, checkpoint_dir=tmp_path)
    c = clone(base)
    tc = FastTrainer(c, strategies=[FastDropout()], seed=3, lr=2e-3, progress=False)
    hc = tc.fit(data, 3, batch_size=8, checkpoint_dir=tmp_path, resume=True)
    assert hc.losses == ha.losses
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)


@serial_only
def test_works_with_preloaded_trimmed_batches(data):
    base = tiny_transformer(dropout=0.1)
    a, b = clone(base), clone(base)
    _, ha = train(a, data, [DevicePreload(), TrimPadding(multiple_of=1)])
    _, hb = train(b, data, [DevicePreload(), TrimPadding(multiple_of=1), FastDropout(exact=True)])
    assert hb.losses == ha.losses


# ---------------------------------------------------------------------------- where it does nothing
def test_parallel_mask_kernel_leaves_dropout_to_torch(data, monkeypatch, caplog):
    """Where torch draws masks with MKL's parallel generator, FastDropout says so and changes nothing."""
    monkeypatch.setattr(dropout_mod, "torch_draws_dropout_serially", lambda: False)
    base = tiny_transformer(dropout=0.1)
    a, b = clone(base), clone(base)
    _, ha = train(a, data)
    with caplog.at_level("INFO", logger="hlbd_fast"):
        tb, hb = train(b, data, [FastDropout()])
    assert not tb.strategies[0].active
    assert "leaves dropout to torch" in caplog.text
    assert hb.losses == ha.losses
    with fast_dropout() as mode:
        assert mode is None  # a null context


# ---------------------------------------------------------------------------- bad input
def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"FastDropout\(exact='yes'\): exact must be True or False"):
        FastDropout(exact="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"fast_dropout\(exact=1\)"):
        fast_dropout(exact=1)  # type: ignore[arg-type]
    with fast_dropout():  # torch's own check, kept
        with pytest.raises(RuntimeError, match=r"bernoulli_ expects p to be in \[0, 1\]"):
            torch.empty(3).bernoulli_(1.5)


def test_compile_is_refused():
    with pytest.raises(StrategyConflictError, match=r"Compile\(.*cannot run with FastDropout.*own generated kernels"):
        FastTrainer(tiny_transformer(), strategies=[FastDropout(), Compile()], progress=False)


def test_repr():
    assert repr(FastDropout()) == "FastDropout(exact=False)"
    assert repr(FastDropout(exact=True)) == "FastDropout(exact=True)"


# ---------------------------------------------------------------------------- the kernel itself
@serial_only
def test_attention_dropout_and_explicit_generators_are_exact_too():
    q = torch.randn(3, 4, 10, 8)
    torch.manual_seed(1)
    theirs = F.scaled_dot_product_attention(q, q, q, dropout_p=0.3)
    g = torch.Generator().manual_seed(9)
    theirs_g = torch.empty(7, 5, dtype=torch.int32).bernoulli_(0.4, generator=g)
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(9)
    with fast_dropout(exact=True) as kernel:
        mine = F.scaled_dot_product_attention(q, q, q, dropout_p=0.3)
        mine_g = torch.empty(7, 5, dtype=torch.int32).bernoulli_(0.4, generator=g)
    assert kernel.calls == 2
    assert torch.equal(bits(theirs), bits(mine))
    assert torch.equal(theirs_g, mine_g)


@serial_only
def test_the_kernel_is_gone_after_the_context_even_on_error():
    x = torch.ones(100, 100)
    with pytest.raises(KeyError):
        with fast_dropout() as kernel:
            F.dropout(x, 0.5)
            raise KeyError("boom")
    assert kernel.calls == 1
    torch.manual_seed(4)
    after = F.dropout(x, 0.5)
    torch.manual_seed(4)
    torch_again = F.dropout(x, 0.5)
    assert kernel.calls == 1  # torch's kernel drew these
    assert torch.equal(after, torch_again)
    with fast_dropout() as outer:  # nested contexts: the outer one is in force again after the inner one
        with fast_dropout(exact=True) as inner:
            F.dropout(x, 0.5)
        F.dropout(x, 0.5)
    assert (outer.calls, inner.calls) == (1, 1)


@serial_only
def test_the_kernel_lives_for_one_fit_even_when_it_fails(data):
    """Registered at the first micro-batch of an epoch, gone when the epoch or fit ends, by an error too;
    train_epoch (the drop-in) too."""

    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_transformer(dropout=0.1)
            self.calls = 0

        def forward(self, src, tgt):
            self.calls += 1
            if self.calls == 3:
                raise KeyError("boom in the third micro-batch")
            return self.inner(src, tgt)

    x = torch.ones(50, 50)
    cases = ((tiny_transformer(dropout=0.1), "fit"), (Boom(), "raises"), (tiny_transformer(dropout=0.1), "train_epoch"), (Boom(), "train_epoch raises"))
    for model, how in cases:
        strategy = FastDropout()
        trainer = FastTrainer(model, strategies=[strategy], seed=3, progress=False)
        if how == "raises":
            with pytest.raises(KeyError, match="boom"):
                trainer.fit(data, 1, batch_size=8)
        elif how == "train_epoch raises":  # 0.1 left the kernel registered here
            with pytest.raises(KeyError, match="boom"):
                trainer.train_epoch(data, batch_size=8)
        elif how == "fit":
            trainer.fit(data, 1, batch_size=8)
        else:
            trainer.train_epoch(data, batch_size=8)
        drawn = strategy.masks_drawn
        assert drawn > 0
        torch.manual_seed(1)
        after = F.dropout(x, 0.5)
        torch.manual_seed(1)
        assert strategy.masks_drawn == drawn  # torch's kernel again
        assert torch.equal(after, F.dropout(x, 0.5))
