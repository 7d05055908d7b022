"""MixedPrecision: bf16 close to fp32, fp16's one GradScaler per run, skipped steps, hook warnings."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import clone, ragged_pairs

from hlbd_fast import FastTrainer, Strategy, StrategyConflictError
from hlbd_fast.history import EpochRecord
from hlbd_fast.models import Seq2SeqTransformer
from hlbd_fast.strategies import Capability, Computes, Context, Precision, precision
from hlbd_fast.strategies.precision import (
    MixedPrecision,
    autocast_context,
    cpu_has_native_bf16,
    find_gradient_hooks,
    resolve_dtype,
    scaler_step,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
VOCAB = 50


def tiny_transformer(seed: int = 0, dropout: float = 0.0) -> Seq2SeqTransformer:
    torch.manual_seed(seed)
    return Seq2SeqTransformer(vocab_size=VOCAB, d_model=32, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=64, dropout=dropout, max_length=16)


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return ragged_pairs(n=120, vocab=VOCAB)  # batch 8: 15 steps per epoch


@pytest.fixture
def fp16_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the fp16 path run on the CPU (publicly an error) to test its logic here."""
    monkeypatch.setattr(precision, "resolve_dtype", lambda dtype, device: "fp16")


class DtypeProbe(Strategy):
    """Records the dtype of the logits the loop computes."""

    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()

    def setup(self, trainer) -> None:
        trainer.model.lm_head.register_forward_hook(lambda m, i, o: self.dtypes.add(o.dtype))


class ScalerProbe(Strategy):
    """Records the MixedPrecision scaler object at every epoch start."""

    def __init__(self, mp: MixedPrecision) -> None:
        self._mp = mp
        self.seen: list[object] = []

    def on_epoch_start(self, trainer, epoch) -> None:
        self.seen.append(self._mp.scaler)


def run(strategies, data, epochs=2, lr=2e-3, seed=0, device="cpu", model=None):
    model = tiny_transformer() if model is None else model
    trainer = FastTrainer(model, strategies=strategies, seed=3, lr=lr, progress=False, device=device, batch_size=8)
    return trainer, trainer.fit(data, epochs)


# ---------------------------------------------------------------------------- bf16
def test_bf16_on_cpu_final_loss_within_2_percent_of_fp32(data):
    """30 steps from the same weights and order: bf16 autocast ends within 2% of fp32, and trains."""
    probe = DtypeProbe()
    mp = MixedPrecision("bf16")
    t32, h32 = run([], data)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "MixedPrecision\\('bf16'\\) on a CPU without native bf16")
        t16, h16 = run([mp, probe], data)
    assert [r.optimizer_steps for r in h16] == [15, 15]
    assert mp.dtype == "bf16" and mp.resolved == "bf16"
    assert t16.reports()["MixedPrecision"].precision == "bf16"
    assert probe.dtypes == {torch.bfloat16}  # autocast was really on
    assert h32.losses[-1] < 0.9 * h32.losses[0]  # the run moved enough for the comparison to mean something
    assert h16.losses[-1] == pytest.approx(h32.losses[-1], rel=0.02)
    assert h16.losses != h32.losses  # not the fp32 loop in disguise


@pytest.mark.filterwarnings("ignore:MixedPrecision\\('bf16'\\) on a CPU without native bf16")
def test_bf16_fills_the_precision_role_without_a_scaler():
    mp = MixedPrecision("bf16")
    t = FastTrainer(tiny_transformer(), strategies=[mp], progress=False)
    assert t.roles.precision is mp and mp.role == "precision"
    assert mp.scaler is None and mp.state_dict() == {}
    declared = mp.declare(Context(t.model, t.device))
    assert declared.provides == () and declared.computes == Computes.PRECISION  # no host decision to step


# ---------------------------------------------------------------------------- resolution and validation
def test_fp16_on_cpu_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match=r"MixedPrecision\('bf16'\)"):
        FastTrainer(tiny_transformer(), strategies=[MixedPrecision("fp16")], device="cpu", progress=False)
    with pytest.raises(ValueError, match="bf16"):
        resolve_dtype("fp16", "cpu")


def test_resolve_and_bad_arguments():
    assert resolve_dtype("auto", "cpu") == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_dtype("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="dtype='fp32'.*'bf16'"):
        resolve_dtype("fp32", "cpu")
    with pytest.raises(ValueError, match=r"MixedPrecision\(dtype='float16'\).*one of"):
        MixedPrecision("float16")
    with pytest.raises(ValueError, match="init_scale"):
        MixedPrecision("fp16", init_scale=0)
    with pytest.raises(ValueError, match="init_scale"):
        MixedPrecision("fp16", init_scale=float("inf"))
    with pytest.raises(ValueError, match="growth_interval"):
        MixedPrecision("fp16", growth_interval=0)
    assert repr(MixedPrecision("bf16")) == "MixedPrecision(dtype='bf16', resolved=None, init_scale=65536.0, growth_interval=2000)"


@pytest.mark.filterwarnings("ignore:MixedPrecision\\('bf16'\\) on a CPU without native bf16")
def test_one_precision_per_trainer_and_fp16_is_not_graph_safe(fp16_on_cpu):
    class OwnStep(Precision):
        def optimizer_step(self, trainer):
            trainer.optimizer.step()
            return False

    with pytest.raises(StrategyConflictError, match=r"MixedPrecision\(dtype='bf16'.*OwnStep.*'precision'"):
        FastTrainer(tiny_transformer(), strategies=[MixedPrecision("bf16"), OwnStep()], progress=False)
    mp = MixedPrecision("fp16")
    FastTrainer(tiny_transformer(), strategies=[mp], progress=False)
    t = FastTrainer(tiny_transformer(), strategies=[MixedPrecision("fp16")], progress=False)
    assert mp.resolved == "fp16"
    assert Capability.HOST_STEP_DECISION in mp.declare(Context(t.model, t.device)).provided()  # the GradScaler decides on the host


def test_forward_context_before_setup_is_an_error():
    with pytest.raises(RuntimeError, match="before setup"):
        MixedPrecision("bf16").forward_context(None)


def test_autocast_context_function():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast_context("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast_context("cpu", "auto"):
        assert (a @ b).dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert (a @ b).dtype == torch.float32


# ---------------------------------------------------------------------------- fp16 logic (run on the CPU)
def test_fp16_one_scaler_for_the_whole_run(fp16_on_cpu, data):
    """Same scaler object every epoch, and its scale keeps growing across epochs (never reset)."""
    mp = MixedPrecision("fp16", init_scale=2.0**8, growth_interval=5)
    probe = ScalerProbe(mp)
    trainer, h = run([mp, probe], data, epochs=3)
    assert mp.resolved == "fp16" and trainer.reports()["MixedPrecision"].precision == "fp16"
    assert isinstance(mp.scaler, torch.amp.GradScaler)
    assert len(probe.seen) == 3 and all(s is mp.scaler for s in probe.seen)
    assert sum(r.skipped_steps for r in h) == 0
    # 45 steps, growth every 5 unskipped steps: 9 doublings. A scaler made per epoch would stop at 2**8 * 2**3.
    assert mp.scaler.get_scale() == 2.0 ** (8 + 9)
    assert [r.extra["loss_scale"] for r in h] == [2.0**11, 2.0**14, 2.0**17]


def test_fp16_scaler_state_survives_save_and_load(fp16_on_cpu, data, tmp_path):
    mp = MixedPrecision("fp16", init_scale=2.0**8, growth_interval=4)
    trainer, _ = run([mp], data, epochs=1)  # 15 steps: 3 doublings, growth tracker at 3
    state = mp.scaler.state_dict()
    assert state["scale"] == 2.0**11 and state["_growth_tracker"] == 3
    trainer.save(tmp_path / "ck.pt")

    mp2 = MixedPrecision("fp16", init_scale=2.0**8, growth_interval=4)
    t2 = FastTrainer(tiny_transformer(seed=1), strategies=[mp2], seed=3, lr=2e-3, progress=False, batch_size=8)
    assert mp2.scaler.get_scale() == 2.0**8
    t2.load(tmp_path / "ck.pt")
    assert mp2.scaler.state_dict() == state
    # and the loaded scaler is the one the run keeps using
    h = t2.fit(data, 2)
    assert len(h) == 2 and mp2.scaler.get_scale() == 2.0 ** (8 + 7)  # 30 steps // 4


@pytest.mark.parametrize("log2_init", [22, 30])
def test_fp16_skipped_steps_are_counted(fp16_on_cpu, data, log2_init):
    """A huge first scale overflows: each skip halves the scale; History counts exactly those skips.

    They are the scaler calibrating in the run's first epoch: no warning.
    """
    mp = MixedPrecision("fp16", init_scale=2.0**log2_init, growth_interval=10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer, h = run([mp], data, epochs=1)
    skipped = h[0].skipped_steps
    final = mp.scaler.get_scale()
    assert 1 <= skipped < h[0].optimizer_steps
    assert skipped == round(math.log2(2.0**log2_init / final))
    # skipped steps did not step the optimizer
    step_counts = {float(s["step"]) for s in trainer.optimizer.state.values()}
    assert step_counts == {float(h[0].optimizer_steps - skipped)}


def test_fp16_many_skips_and_collapsed_scale_warn_once(fp16_on_cpu, data):
    """The first epoch's back-offs from init_scale are calibration; skipping on after that warns."""
    mp = MixedPrecision("fp16", init_scale=2.0**100, growth_interval=10_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, h = run([mp], data, epochs=2)
    assert [r.skipped_steps for r in h] == [15, 15]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "epoch 2 skipped 15 of 15 optimizer steps" in messages[0]
    # the scale collapsing below 1 (gradients overflow even unscaled) is its own warning
    mp.scaler.update(new_scale=0.25)
    record = EpochRecord(
        epoch=2, loss=1.0, seconds=1.0, tokens_per_second=1.0, optimizer_steps=10, skipped_steps=10, micro_batches=10, empty_micro_batches=0, tokens=100
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mp.on_epoch_end(None, record)  # type: ignore[arg-type]
        mp.on_epoch_end(None, record)  # type: ignore[arg-type]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "collapsed to 0.25" in messages[0]  # once; the skip warning was already given
    assert record.extra["loss_scale"] == 0.25


def test_scaler_step_function_reports_skips_on_the_device():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(p.sum()).backward()
    p.grad = torch.tensor([4.0, 4.0, float("inf")])
    skipped = scaler_step(scaler, opt)
    assert isinstance(skipped, torch.Tensor) and skipped.dim() == 0 and bool(skipped)
    assert torch.equal(p.detach(), torch.ones(3)) and scaler.get_scale() == 2.0
    scaler.scale(p.sum()).backward()
    p.grad = torch.tensor([2.0, 2.0, 2.0])  # 1.0 after unscaling by 2
    skipped = scaler_step(scaler, opt)
    assert not bool(skipped)
    assert torch.allclose(p.detach(), torch.full((3,), 0.9))


def test_scaler_step_tells_a_grown_scale_from_a_skip():
    """A step that grows the scale (growth_interval reached) stepped; one that found inf/NaN backed off and skipped."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=1)
    scaler.scale(p.sum()).backward()
    skipped = scaler_step(scaler, opt)
    assert not bool(skipped) and scaler.get_scale() == 8.0
    opt.zero_grad()
    scaler.scale(p.sum()).backward()
    p.grad[0] = float("nan")
    skipped = scaler_step(scaler, opt)
    assert bool(skipped) and scaler.get_scale() == 4.0


# ---------------------------------------------------------------------------- gradient hooks
def nan_to_zero(grad: torch.Tensor) -> torch.Tensor:
    """The kind of hook that broke the run: it hides overflows from the scaler."""
    return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


def test_find_gradient_hooks():
    m = tiny_transformer()
    assert find_gradient_hooks(m) == []
    m.encoder_norm.weight.register_hook(nan_to_zero)
    m.decoder_norm.bias.register_post_accumulate_grad_hook(lambda t: None)
    m.decoder_layers[0].register_full_backward_hook(lambda mod, gi, go: None)
    found = find_gradient_hooks(m)
    assert found == [
        "parameter 'encoder_norm.weight' (register_hook)",
        "parameter 'decoder_norm.bias' (register_post_accumulate_grad_hook)",
        "module 'decoder_layers.0' (backward hook)",
    ]


def test_fp16_warns_about_gradient_hooks(fp16_on_cpu, data):
    """Hooks present when the trainer is built, or added before fit, are named in a warning."""
    m = tiny_transformer()
    for p in m.parameters():
        p.register_hook(nan_to_zero)
    with pytest.warns(RuntimeWarning, match=r"parameter 'embed.weight' \(register_hook\).*hides overflows"):
        trainer = FastTrainer(m, strategies=[MixedPrecision("fp16", init_scale=2.0**40)], progress=False, batch_size=8)
    m.encoder_norm.register_full_backward_hook(lambda mod, gi, go: None)
    with pytest.warns(RuntimeWarning, match="module 'encoder_norm'") as caught:
        h = trainer.fit(data, 1)
    assert not any("embed.weight" in str(w.message) for w in caught)  # already reported, not repeated
    # what such hooks do: the overflow is zeroed away, the scaler never sees it and never backs off
    assert h[0].skipped_steps == 0
    assert trainer.strategies[0].scaler.get_scale() == 2.0**40


def test_bf16_does_not_warn_about_hooks(data, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)  # only the hook warning is in question
    m = tiny_transformer()
    m.embed.weight.register_hook(nan_to_zero)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FastTrainer(m, strategies=[MixedPrecision("bf16")], progress=False).fit(data, 1, batch_size=40)


# ---------------------------------------------------------------------------- CUDA
@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cuda_final_loss_within_half_percent_of_fp32(dtype, data):
    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    base = tiny_transformer()
    _, h32 = run([], data, epochs=3, device="cuda", model=clone(base))
    mp = MixedPrecision(dtype)
    _, hmp = run([mp], data, epochs=3, device="cuda", model=clone(base))
    assert mp.resolved == dtype
    assert h32.losses[-1] < 0.9 * h32.losses[0]
    assert hmp.losses[-1] == pytest.approx(h32.losses[-1], rel=0.005)
    if dtype == "fp16":
        assert sum(r.skipped_steps for r in hmp) <= 3


def test_auto_on_a_cpu_without_native_bf16_keeps_fp32_and_bf16_warns(monkeypatch, caplog):
    """Emulated bf16 is slower than fp32: "auto" keeps fp32 there (said in the log); "bf16" warns."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    mp = MixedPrecision("auto")
    with caplog.at_level("INFO", logger="hlbd_fast"):
        t = FastTrainer(tiny_transformer(), strategies=[mp], progress=False)
    assert mp.resolved == "fp32" and t.reports()["MixedPrecision"].precision == "fp32"
    assert "no native bf16" in caplog.text
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with mp.forward_context(t):
        assert (a @ b).dtype == torch.float32
    with pytest.warns(RuntimeWarning, match=r"without native bf16.*MixedPrecision\('auto'\)"):
        FastTrainer(tiny_transformer(), strategies=[MixedPrecision("bf16")], progress=False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") == "bf16"
