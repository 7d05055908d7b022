"""Compile: compiled training equals eager; failures fall back loudly; breaks and recompiles are reported.

Most tests use ``backend="eager"`` (dynamo's capture without code generation: fast) or
``"aot_eager"`` (adds the forward/backward graph split). The inductor test compiles C++
kernels with gcc, which takes one to two minutes on a 2-core CPU with a cold cache: it is
marked ``slow`` (deselect with ``-m "not slow"``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import TinySeq2Seq, clone, max_rel_diff, ragged_pairs

from hlbd_fast import FastTrainer
from hlbd_fast.checkpoint import read_checkpoint
from hlbd_fast.models import Seq2SeqTransformer
from hlbd_fast.strategies.checkpointing import GradientCheckpointing
from hlbd_fast.strategies.compile import COMPILE_MODES, CompilationError, Compile, CompiledModel, compile_model

VOCAB = 50
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
slow = pytest.mark.slow


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts from dynamo's initial state (caches, counters)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_transformer(seed: int = 0, dropout: float = 0.0) -> Seq2SeqTransformer:
    torch.manual_seed(seed)
    return Seq2SeqTransformer(vocab_size=VOCAB, d_model=32, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=64, dropout=dropout, max_length=16)


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return ragged_pairs(n=24, vocab=VOCAB)  # batch 8: 3 steps per epoch, one input shape


def fit(model, data, strategies=(), epochs=1, lr=0.1):
    # SGD: Adam would turn the rounding noise in the transformer's key biases (whose true
    # gradient is zero) into lr-sized steps, hiding what is compared here
    trainer = FastTrainer(model, strategies=list(strategies), optimizer=torch.optim.SGD(model.parameters(), lr=lr), seed=1, progress=False, batch_size=8)
    return trainer, trainer.fit(data, epochs)


# ---------------------------------------------------------------------------- equality
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_training_equals_eager(data, backend):
    base = tiny_transformer(dropout=0.0)
    a, b = clone(base), clone(base)
    _, ha = fit(a, data, epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the happy path warns about nothing
        tb, hb = fit(b, data, [Compile(backend=backend)], epochs=2)
    assert isinstance(tb.train_model, CompiledModel) and tb.model is b  # the original holds the weights
    assert hb.losses == pytest.approx(ha.losses, rel=1e-5)
    assert max_rel_diff(a, b) < 1e-5
    assert max_rel_diff(b, base) > 1e-3  # trained
    info = tb.reports()["Compile"]
    assert info.compile_seconds > 0 and info.graph_breaks == [] and info.recompiles == []
    assert info.input_shapes == 1 and info.compile_fallback is None
    assert tb.train_model.compiling_calls == 1  # compiled once, then reused for 5 more steps


@slow
@pytest.mark.slow
def test_inductor_default_within_1e_5_of_eager(data):
    base = tiny_transformer()
    a, b = clone(base), clone(base)
    _, ha = fit(a, data)
    tb, hb = fit(b, data, [Compile("default")])
    assert tb.reports()["Compile"].compile_fallback is None
    assert hb.losses == pytest.approx(ha.losses, rel=1e-5)
    assert max_rel_diff(a, b) < 1e-5
    assert tb.reports()["Compile"].compile_seconds > 0


def test_with_gradient_checkpointing_and_dropout(data):
    """Checkpointed layers compile too; dropout on: same losses and weights as eager checkpointed training."""
    base = tiny_transformer(dropout=0.2)
    a, b = clone(base), clone(base)
    torch.manual_seed(5)
    _, ha = fit(a, data, [GradientCheckpointing()])
    torch.manual_seed(5)
    tb, hb = fit(b, data, [GradientCheckpointing(), Compile(backend="aot_eager")])
    assert hb.losses == pytest.approx(ha.losses, rel=1e-5)
    assert max_rel_diff(a, b) < 1e-5


def test_eager_backend_with_checkpointed_layers_warns():
    """torch's debugging 'eager' backend recomputes checkpointed layers with other dropout masks."""
    m = tiny_transformer(dropout=0.2)
    with pytest.warns(RuntimeWarning, match="backend='eager'.*checkpointed.*aot_eager"):
        FastTrainer(m, strategies=[GradientCheckpointing(), Compile(backend="eager")], progress=False)


def test_checkpoint_keys_are_the_models(data, tmp_path):
    m = tiny_transformer()
    t, _ = fit(m, data, [Compile(backend="eager")])
    t.save(tmp_path / "c.pt")
    state = read_checkpoint(tmp_path / "c.pt")
    assert list(state["model"]) == list(tiny_transformer().state_dict())


# ---------------------------------------------------------------------------- failures
def failing_backend(gm, example_inputs):
    raise RuntimeError("no C compiler found (test)")


def test_failed_compilation_falls_back_to_eager_with_one_warning(data):
    base = tiny_transformer(dropout=0.3)  # dropout on: the fallback must draw the same masks
    a, b = clone(base), clone(base)
    _, ha = fit(a, data, epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tb, hb = fit(b, data, [Compile(backend=failing_backend)], epochs=2)
    ours = [str(w.message) for w in caught if "Compile" in str(w.message)]
    assert len(ours) == 1
    assert "torch.compile failed" in ours[0] and "no C compiler found (test)" in ours[0] and "strict=True" in ours[0]
    assert hb.losses == ha.losses
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert "no C compiler found (test)" in tb.reports()["Compile"].compile_fallback


class DropoutItemModel(TinySeq2Seq):
    """Dropout, then a graph break, then more graph: the first piece runs before the second compiles."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(vocab_size=VOCAB, dropout=0.3)

    def forward(self, src, tgt_in):
        logits = super().forward(src, tgt_in)
        if logits.abs().max().item() > 1e6:
            logits = logits / 2
        return logits * 1.0 + 0.0


def test_fallback_after_a_partial_compiled_run_draws_the_eager_masks(data):
    """The first compiled piece ran (drawing dropout masks) before a later piece failed to compile."""
    calls = [0]

    def second_graph_fails(gm, example_inputs):
        calls[0] += 1
        if calls[0] >= 2:
            raise RuntimeError("second graph fails (test)")
        return gm.forward

    a, b = DropoutItemModel(), DropoutItemModel()
    _, ha = fit(a, data, epochs=2)
    with pytest.warns(RuntimeWarning, match="second graph fails"):
        _, hb = fit(b, data, [Compile(backend=second_graph_fails)], epochs=2)
    assert calls[0] >= 2
    assert hb.losses == ha.losses
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_torch_compile_refusing_the_model_falls_back(data, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("torch.compile is not supported on this Python (test)")

    monkeypatch.setattr(torch, "compile", refuse)
    with pytest.warns(RuntimeWarning, match=r"torch.compile failed \(RuntimeError: torch.compile is not supported"):
        t, h = fit(tiny_transformer(), data, [Compile()])
    assert len(h) == 1 and t.reports()["Compile"].compile_fallback.startswith("RuntimeError")
    with pytest.raises(CompilationError, match="not supported on this Python"):
        fit(tiny_transformer(), data, [Compile(strict=True)])


def test_strict_raises(data):
    with pytest.raises(CompilationError, match=r"strict=True.*no C compiler found \(test\)"):
        fit(tiny_transformer(), data, [Compile(backend=failing_backend, strict=True)])


def test_the_models_own_errors_are_not_a_fallback(data):
    m = tiny_transformer()
    t = FastTrainer(m, strategies=[Compile(backend="eager")], progress=False)
    too_long = torch.ones(2, 20, dtype=torch.long)
    with pytest.raises(ValueError, match="max_length"):
        t.train_model(too_long, too_long)
    assert t.train_model.failure is None
    t.train_model(data[0][:2], data[1][:2])  # still compiled
    assert t.train_model.compiling_calls == 1


def test_fullgraph_with_a_graph_break_falls_back(data):
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*Unsupported"):
        t, h = fit(ItemModel(), data, [Compile(backend="eager", fullgraph=True)])
    assert len(h) == 1 and t.reports()["Compile"].compile_fallback.startswith("Unsupported")


# ---------------------------------------------------------------------------- reporting
class ItemModel(TinySeq2Seq):
    """A model that reads a value back inside forward: a graph break."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(vocab_size=VOCAB)

    def forward(self, src, tgt_in):
        logits = super().forward(src, tgt_in)
        if logits.abs().max().item() > 1e6:  # host read: dynamo must stop the graph here
            logits = logits / 2
        return logits


def test_graph_breaks_are_reported_once(data):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t, h = fit(ItemModel(), data, [Compile(backend="eager")], epochs=3)
    breaks = t.reports()["Compile"].graph_breaks
    assert breaks and any("item()" in b["reason"] for b in breaks)
    assert any(b["where"].startswith(__file__) for b in breaks)
    ours = [str(w.message) for w in caught if "graph break" in str(w.message)]
    assert len(ours) == 1 and "item()" in ours[0] and "test_compile.py" in ours[0]
    assert t.reports()["Compile"].compile_fallback is None and len(h) == 3


def test_recompiles_are_counted_with_their_reason():
    src, tgt = ragged_pairs(n=20, vocab=VOCAB)  # batches of 8, 8, 4: the last one recompiles
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t, _ = fit(tiny_transformer(), (src, tgt), [Compile(backend="eager")], epochs=2)
    rec = t.reports()["Compile"].recompiles
    assert len(rec) == 1 and rec[0]["count"] == 1 and "size mismatch at index 0" in rec[0]["reason"]
    assert t.reports()["Compile"].input_shapes == 2
    ours = [str(w.message) for w in caught if "recompiled" in str(w.message)]
    assert len(ours) == 1 and "size mismatch" in ours[0]


def test_many_input_shapes_warn_once():
    model = TinySeq2Seq(vocab_size=VOCAB)
    cm = compile_model(model, backend="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for length in range(3, 10):
            cm(torch.ones(2, length, dtype=torch.long), torch.ones(2, length, dtype=torch.long))
    ours = [str(w.message) for w in caught if "different input shapes" in str(w.message)]
    assert len(ours) == 1 and "TrimPadding(buckets=...)" in ours[0] and "dynamic=True" in ours[0]
    assert len(cm.shapes) == 7

    torch._dynamo.reset()
    cm = compile_model(TinySeq2Seq(vocab_size=VOCAB), backend="eager", dynamic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for length in range(3, 10):
            cm(torch.ones(2, length, dtype=torch.long), torch.ones(2, length, dtype=torch.long))
    assert cm.report()["recompiles"] == []


def test_compiled_model_function_reports():
    model = TinySeq2Seq(vocab_size=VOCAB)
    cm = compile_model(model, backend="eager")
    x = torch.ones(2, 5, dtype=torch.long)
    out = cm(x, x)
    assert torch.equal(out, model(x, x))
    r = cm.report()
    assert r["compile_seconds"] > 0 and r["input_shapes"] == 1 and r["compile_fallback"] is None
    assert r["graph_breaks"][0]["where"].endswith("conftest.py:28")  # dynamo does not trace nn.GRU
    assert cm.model is model


# ---------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="fast"), "mode must be one of .*'default', 'reduce-overhead', 'max-autotune'"),
        (dict(fullgraph="yes"), "fullgraph"),
        (dict(strict=1), "strict"),
        (dict(dynamic="auto"), "dynamic"),
        (dict(backend="no-such-backend"), "unknown backend"),
        (dict(backend=""), "backend"),
        (dict(mode="max-autotune", backend="eager"), "inductor"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Compile(**kwargs)


def test_repr_and_modes():
    assert repr(Compile()) == "Compile(mode='default', fullgraph=False, dynamic=False, strict=False, backend='inductor')"
    assert set(COMPILE_MODES) >= {"default", "reduce-overhead", "max-autotune"}
    assert Compile.order == 100


@cuda
@pytest.mark.cuda
def test_cuda_inductor_within_1e_5_of_eager(data):
    base = tiny_transformer().cuda()
    a, b = clone(base), clone(base)
    _, ha = fit(a, data)
    tb, hb = fit(b, data, [Compile("default")])
    assert tb.reports()["Compile"].compile_fallback is None
    assert hb.losses == pytest.approx(ha.losses, rel=1e-5)
    assert max_rel_diff(a, b) < 1e-5
