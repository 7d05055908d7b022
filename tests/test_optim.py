"""FusedAdamW: the same update as torch's plain AdamW (and Adam), one owner of the optimizer."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
from conftest import TinySeq2Seq, clone, max_rel_diff, ragged_pairs

from hlbd_fast import FastTrainer, StrategyConflictError
from hlbd_fast.models import Seq2SeqTransformer
from hlbd_fast.strategies import optim as optim_module
from hlbd_fast.strategies.optim import FusedAdamW, fused_adamw

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
VOCAB = 50


def tiny_transformer(seed: int = 0) -> Seq2SeqTransformer:
    torch.manual_seed(seed)
    return Seq2SeqTransformer(vocab_size=VOCAB, d_model=32, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=64, dropout=0.0, max_length=16)


def tiny_gru(seed: int = 0) -> TinySeq2Seq:
    torch.manual_seed(seed)
    return TinySeq2Seq(vocab_size=VOCAB)


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return ragged_pairs(n=48, vocab=VOCAB)  # batch 8: 6 steps per epoch


# Multi-step weight comparisons use the GRU model: every parameter of it gets a real
# gradient. The transformer's key-projection biases get a gradient that is zero up to
# rounding (softmax ignores a constant added to all keys); Adam divides that rounding
# noise by its own size and moves those biases by about lr per step, so ANY change of
# float rounding (fused kernel, another summation order) shows there after two steps.
# On the transformer the update itself is compared, from the same weights and gradients.


HP = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.05)


def fit(model, data, device="cpu", **kw):
    trainer = FastTrainer(model, seed=4, progress=False, batch_size=8, device=device, **kw)
    trainer.fit(data, 2)
    return trainer


def test_fused_adamw_equals_plain_adamw(data):
    """12 steps with non-default hyper-parameters: weights within 1e-6 of torch.optim.AdamW (per-parameter loop)."""
    base = tiny_gru()
    a, b = clone(base), clone(base)
    ta = fit(a, data, strategies=[FusedAdamW(**HP)])
    plain = torch.optim.AdamW(b.parameters(), foreach=False, **HP)
    fit(b, data, optimizer=plain)
    assert isinstance(ta.optimizer, torch.optim.AdamW)
    fused_here = optim_module._fused_supported(torch.device("cpu"))
    assert bool(ta.optimizer.defaults["fused"]) == fused_here
    assert bool(ta.optimizer.defaults["foreach"]) == (not fused_here)
    assert ta.optimizer.defaults["weight_decay"] == 0.05 and ta.optimizer.defaults["betas"] == (0.8, 0.99)
    assert max_rel_diff(a, base) > 1e-3  # the weights moved
    assert max_rel_diff(a, b) < 1e-6


def test_default_fused_adamw_is_the_plain_loops_adam(data):
    """FusedAdamW() (weight_decay 0, the trainer's lr) computes the trainer's default Adam(lr) update."""
    base = tiny_gru()
    a, b = clone(base), clone(base)
    ta = fit(a, data, strategies=[FusedAdamW()], lr=2e-3)
    fit(b, data, lr=2e-3)
    assert ta.optimizer.defaults["lr"] == 2e-3
    assert max_rel_diff(a, base) > 1e-3
    assert max_rel_diff(a, b) < 1e-6


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_foreach_fallback_is_logged_and_equal(data, monkeypatch):
    monkeypatch.setattr(optim_module, "_fused_supported", lambda device: False)
    base = tiny_gru()
    a, b = clone(base), clone(base)
    log, handler = logging.getLogger("hlbd_fast"), Collect()
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        ta = fit(a, data, strategies=[FusedAdamW(**HP)])
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert ta.optimizer.defaults["foreach"] is True and not ta.optimizer.defaults["fused"]
    said = [m for m in handler.messages if "FusedAdamW" in m]
    assert len(said) == 1 and "foreach" in said[0]
    fit(b, data, optimizer=torch.optim.AdamW(b.parameters(), foreach=False, **HP))
    assert max_rel_diff(a, b) < 1e-6


def test_one_step_on_the_transformer_equals_plain_adamw(data):
    """Same weights, same gradients: FusedAdamW's first update is plain AdamW's within 1e-6."""
    base = tiny_transformer()
    a, b = clone(base), clone(base)
    ta = FastTrainer(a, strategies=[FusedAdamW(**HP)], seed=4, progress=False, batch_size=8)
    tb = FastTrainer(b, optimizer=torch.optim.AdamW(b.parameters(), foreach=False, **HP), seed=4, progress=False, batch_size=8)
    batch = (data[0][:8], data[1][:8])
    ta.train_epoch(batch, shuffle=False)
    tb.train_epoch(batch, shuffle=False)
    assert max_rel_diff(a, base) > 1e-3
    assert max_rel_diff(a, b) < 1e-6


def test_lr_none_uses_the_trainers_lr_and_an_explicit_lr_wins():
    t = FastTrainer(tiny_transformer(), strategies=[FusedAdamW()], lr=7e-4, progress=False)
    assert t.optimizer.param_groups[0]["lr"] == 7e-4
    t = FastTrainer(tiny_transformer(), strategies=[FusedAdamW(lr=1e-2)], lr=7e-4, progress=False)
    assert t.optimizer.param_groups[0]["lr"] == 1e-2


def test_optimizer_and_strategy_together_is_an_error():
    m = tiny_transformer()
    with pytest.raises(StrategyConflictError, match="AdamW.*FusedAdamW.*keep one"):
        FastTrainer(m, optimizer=torch.optim.AdamW(m.parameters()), strategies=[FusedAdamW()], progress=False)


def test_eight_bit_without_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install hlbd-fast\[bnb\]"):
        FusedAdamW(eight_bit=True)


def test_eight_bit_builds_bitsandbytes_adamw8bit(monkeypatch):
    made = {}

    class FakeAdamW8bit(torch.optim.AdamW):
        def __init__(self, params, **kw):
            made.update(kw)
            super().__init__(params, **kw)

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=FakeAdamW8bit)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    t = FastTrainer(tiny_transformer(), strategies=[FusedAdamW(eight_bit=True, **HP)], progress=False)
    assert isinstance(t.optimizer, FakeAdamW8bit)
    assert made == HP


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=0.0), "lr=0.0"),
        (dict(lr=-1e-3), "lr=-0.001"),
        (dict(lr=float("nan")), "lr=nan"),
        (dict(betas=(0.9,)), "betas"),
        (dict(betas=(0.9, 1.0)), r"betas\[1\]=1.0"),
        (dict(eps=0.0), "eps=0.0"),
        (dict(weight_decay=-0.1), "weight_decay=-0.1"),
        (dict(eight_bit="yes"), "eight_bit"),
        (dict(capturable=1), "capturable"),
        (dict(eight_bit=True, capturable=True), "drop one"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedAdamW(**kwargs)


def test_capturable_on_cpu_is_an_error():
    with pytest.raises(ValueError, match="capturable=True.*cpu.*capturable=False"):
        FastTrainer(tiny_transformer(), strategies=[FusedAdamW(capturable=True)], progress=False, device="cpu")


def test_repr_and_function():
    assert repr(FusedAdamW()) == ("FusedAdamW(lr=None, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.0, eight_bit=False, capturable=False)")
    p = [torch.nn.Parameter(torch.randn(3))]
    opt = fused_adamw(p, lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["lr"] == 1e-3


@cuda
@pytest.mark.cuda
def test_cuda_fused_equals_unfused(data):
    base = tiny_gru()
    a, b = clone(base), clone(base)
    ta = fit(a, data, device="cuda", strategies=[FusedAdamW(**HP)])
    assert ta.optimizer.defaults["fused"] is True
    fit(b, data, device="cuda", optimizer=torch.optim.AdamW(b.to("cuda").parameters(), foreach=False, **HP))
    assert max_rel_diff(a, base.to("cuda")) > 1e-3
    assert max_rel_diff(a, b) < 1e-6


@cuda
@pytest.mark.cuda
def test_cuda_capturable_builds():
    t = FastTrainer(tiny_transformer(), strategies=[FusedAdamW(capturable=True)], device="cuda", progress=False)
    assert t.optimizer.defaults["capturable"] is True and t.optimizer.defaults["fused"] is True
