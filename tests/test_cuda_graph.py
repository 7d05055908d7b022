"""CUDAGraphStep: the replayed step computes what the eager step computes, or falls back loudly.

Three parts: the CPU fallback and the refused configurations; the graph path's
bookkeeping driven on CPU through ``CUDAGraphStep(backend=...)`` with a stand-in for CUDA
(capture runs the step's Python and undoes its tensor effects, replay re-runs the device
work); and CUDA-only tests that prove the equality claims on a GPU.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from conftest import TinySeq2Seq, clone, max_rel_diff, ragged_pairs
from cuda_standin import StandInBackend
from torch import nn

from hlbd_fast import DeferredLossSync, EagerLossSync, FastTrainer, GradientAccumulation, GradientCheckpointing, StrategyConflictError
from hlbd_fast.schedules import warmup_cosine
from hlbd_fast.strategies import Capability, Declaration, Need, Precision, Strategy, precision
from hlbd_fast.strategies.cuda_graph import CUDAGraphStep, _fill, _make_capturable, _step_key, first_sync, others
from hlbd_fast.strategies.data import DevicePreload
from hlbd_fast.strategies.optim import FusedAdamW
from hlbd_fast.strategies.padding import TrimPadding

needs_cuda = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def cuda_test(f):
    for mark in needs_cuda:
        f = mark(f)
    return f


def padded_pairs(n: int = 42, extra: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    src, tgt = ragged_pairs(n=n)
    z = torch.zeros(n, extra, dtype=torch.long)
    return torch.cat([src, z], 1), torch.cat([tgt, z], 1)


def graph_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "CUDAGraphStep" in str(w.message)]


def identical(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


class HostDecidesTheStep(Precision):
    """Stands in for MixedPrecision('fp16'), whose GradScaler decides on the host whether to step."""

    def declare(self, context):
        return Declaration(provides=(Need(Capability.HOST_STEP_DECISION, "it reads the gradients back; use MixedPrecision('bf16')"),))


class CountsSteps(Strategy):
    """Host work in a step hook: a Python counter, as examples/custom_strategy.py's GradNormLog keeps."""

    def __init__(self):
        self.seen = 0

    def before_clip(self, trainer):
        self.seen += 1


# ---------------------------------------------------------------------------- CPU: fallback and refusals
@pytest.mark.parametrize("accumulation", [1, 2])
def test_on_cpu_one_warning_and_exactly_the_eager_loop(accumulation):
    torch.manual_seed(0)
    base = TinySeq2Seq(dropout=0.3)
    a, b = clone(base), clone(base)
    step = CUDAGraphStep()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t = FastTrainer(a, strategies=[DevicePreload(), DeferredLossSync(), GradientAccumulation(accumulation), step], seed=2, progress=False, lr=1e-3)
        h = t.fit(ragged_pairs(n=42), 2, batch_size=4)
    assert graph_warnings(record) == [
        "CUDAGraphStep: running the eager step instead of a CUDA graph: the trainer's device is cpu; CUDA graphs need a CUDA device"
    ]
    assert not step.graphing and "device is cpu" in step.report().fallback
    h_ref = FastTrainer(b, strategies=[DevicePreload(), DeferredLossSync(), GradientAccumulation(accumulation)], seed=2, progress=False, lr=1e-3).fit(
        ragged_pairs(n=42), 2, batch_size=4
    )
    assert h.losses == h_ref.losses
    assert identical(a, b)


@pytest.mark.parametrize(
    "strategies, error, match",
    [
        ([DeferredLossSync()], ValueError, r"CUDAGraphStep.*needs batches already on the device.*add DevicePreload\(\)"),
        ([DevicePreload(), EagerLossSync()], StrategyConflictError, r"cannot run with EagerLossSync\(\).*use DeferredLossSync"),
        ([DevicePreload(), HostDecidesTheStep()], StrategyConflictError, r"cannot run with HostDecidesTheStep.*MixedPrecision\('bf16'\)"),
        ([DevicePreload(), "fp16"], StrategyConflictError, r"cannot run with MixedPrecision\(dtype='fp16'.*MixedPrecision\('bf16'\)"),
        ([DevicePreload(), GradientCheckpointing()], StrategyConflictError, r"cannot run with GradientCheckpointing.*generator's state"),
        (
            [DevicePreload(), CountsSteps()],
            StrategyConflictError,
            r"cannot run with CountsSteps.*CountsSteps.before_clip runs Python at every step.*step_hook_work",
        ),
    ],
)
@pytest.mark.filterwarnings("ignore:CUDAGraphStep. running the eager step")
def test_refused_combinations(strategies, error, match, monkeypatch):
    """Each combination the step's declaration forbids is refused when the trainer is built, naming the fix."""
    extra = []
    if "fp16" in strategies:  # fp16 is publicly refused on the CPU: let it resolve here to reach CUDAGraphStep's check
        monkeypatch.setattr(precision, "resolve_dtype", lambda dtype, device: "fp16")
        extra = [precision.MixedPrecision("fp16")]
    strategies = [s for s in strategies if s != "fp16"]
    with pytest.raises(error, match=match):
        FastTrainer(TinySeq2Seq(), strategies=[*strategies, CUDAGraphStep(), *extra], progress=False)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "3"])
def test_bad_warmup_steps(value):
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 1"):
        CUDAGraphStep(warmup_steps=value)


def test_make_capturable_switches_groups_that_have_the_option():
    p = nn.Parameter(torch.randn(3))
    adam = torch.optim.Adam([p])
    _make_capturable(adam)
    assert adam.param_groups[0]["capturable"] is True
    sgd = torch.optim.SGD([p], lr=0.1)  # no such option: left alone
    _make_capturable(sgd)
    assert "capturable" not in sgd.param_groups[0]


def test_step_key_and_static_buffers():
    a = (torch.ones(4, 5, dtype=torch.long), torch.ones(4, 7, dtype=torch.long))
    b = (torch.ones(2, 3, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
    assert _step_key([a, b]) == (2, (4, 2), 5, 8, torch.long, torch.long)
    buf = torch.full((2, 5), 9)
    _fill(buf, b[0], 0)
    assert buf.tolist() == [[1, 1, 1, 0, 0]] * 2
    with pytest.raises(TypeError, match=r"\(src, tgt\) pairs.*3 items"):
        _step_key([(*a, a[0])])


# ---------------------------------------------------------------------------- CPU: the graph path with stand-in graphs
def make(strategies, seed=6, dropout=0.3):
    torch.manual_seed(0)
    model = TinySeq2Seq(dropout=dropout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU fallback warning of construction
        trainer = FastTrainer(model, strategies=strategies, seed=seed, progress=False, lr=1e-3)
    step = trainer.roles.step
    if isinstance(step, CUDAGraphStep) and isinstance(step_backend(step), StandInBackend):
        step_backend(step).trainer = trainer
    return model, trainer


def step_backend(step):
    return step.backend


def graph_step(warmup_steps, **kw):
    """A CUDAGraphStep on a CPU stand-in backend; returns (step, backend)."""
    backend = StandInBackend(**kw)
    return CUDAGraphStep(warmup_steps=warmup_steps, backend=backend), backend


@pytest.mark.parametrize("accumulation", [1, 2])
def test_graph_path_replays_exactly_the_eager_steps(accumulation):
    """Warm-up, capture per step shape (the epoch's partial last step too), replays: the eager loop, bit for bit."""
    step, backend = graph_step(2)
    ours, t = make([DevicePreload(), DeferredLossSync(), GradientAccumulation(accumulation), step])
    graphs = backend.graphs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no re-capture
        h = t.fit(ragged_pairs(n=42), 3, batch_size=4)
    ref, t_ref = make([DevicePreload(), DeferredLossSync(), GradientAccumulation(accumulation)])
    h_ref = t_ref.fit(ragged_pairs(n=42), 3, batch_size=4)
    assert h.losses == h_ref.losses
    assert identical(ours, ref)
    assert [(r.micro_batches, r.optimizer_steps, r.tokens) for r in h] == [(r.micro_batches, r.optimizer_steps, r.tokens) for r in h_ref]
    assert step.graphing and step.report().graphs == len(graphs) == 2  # full steps, and the partial last step
    assert step.report().capture_seconds > 0
    steps = sum(r.optimizer_steps for r in h)
    assert sum(g.replays for g in graphs) == steps - 2 * step.warmup_steps
    assert t.global_step == steps


def test_graph_path_with_buckets_pads_micro_batches_to_the_step_shape():
    """TrimPadding buckets: one graph per bucket pair; with accumulation, a step's shorter micro-batches are padded up."""
    data = padded_pairs()
    buckets = (4, 8, 12)
    for accumulation in (1, 2):
        step, backend = graph_step(1)
        ours, t = make([DevicePreload(), TrimPadding(buckets=buckets), GradientAccumulation(accumulation), step], dropout=0.0)
        graphs = backend.graphs
        h = t.fit(data, 3, batch_size=4)
        ref, t_ref = make([DevicePreload(), TrimPadding(buckets=buckets), GradientAccumulation(accumulation)], dropout=0.0)
        h_ref = t_ref.fit(data, 3, batch_size=4)
        assert len(graphs) >= 2
        assert {k[2] for k in step.shapes()} <= set(buckets) and {k[3] for k in step.shapes()} <= set(buckets)
        if accumulation == 1:  # every micro-batch is its own step: the eager shapes exactly
            assert h.losses == h_ref.losses and identical(ours, ref)
        else:  # padded columns are masked: equal up to float rounding
            assert h.losses == pytest.approx(h_ref.losses, rel=1e-6)
            assert max_rel_diff(ours, ref) < 1e-5
        assert [r.tokens for r in h] == [r.tokens for r in h_ref]


def test_a_failed_capture_falls_back_with_one_warning_and_changes_nothing():
    step, _ = graph_step(1, fail="operation not permitted when stream is capturing")
    ours, t = make([DevicePreload(), GradientAccumulation(2), step])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        h = t.fit(ragged_pairs(n=42), 2, batch_size=4)
    assert graph_warnings(record) == [
        "CUDAGraphStep: running the eager step instead of a CUDA graph: capturing the step failed "
        "(RuntimeError: operation not permitted when stream is capturing)"
    ]
    assert not step.graphing and "capturing the step failed" in step.report().fallback
    ref, t_ref = make([DevicePreload(), GradientAccumulation(2)])
    h_ref = t_ref.fit(ragged_pairs(n=42), 2, batch_size=4)
    assert h.losses == h_ref.losses and identical(ours, ref)
    assert [r.micro_batches for r in h] == [r.micro_batches for r in h_ref]


def test_a_failed_capture_that_broke_the_process_stops_the_run_loudly():
    """Older torch leaves the generator capturing after a failed capture: no silent eager run in a broken process."""
    step, _ = graph_step(
        1,
        fail="operation failed due to a previous error during capture",
        broken="RuntimeError: Offset increment outside graph capture encountered unexpectedly.",
    )
    ours, t = make([DevicePreload(), step])
    with pytest.raises(
        RuntimeError,
        match=r"capturing the step failed.*left this process unable to run CUDA work eagerly "
        r"\(RuntimeError: Offset increment.*Restart, and train without CUDAGraphStep",
    ):
        t.fit(ragged_pairs(n=42), 1, batch_size=4)


def _warning(message: str) -> warnings.WarningMessage:
    return warnings.WarningMessage(UserWarning(message), UserWarning, "model.py", 7)


def test_torchs_one_time_debug_mode_notice_is_not_a_sync():
    """The notice torch prints when sync-debug mode is first set in a process made every first capture fall back."""
    notice = _warning("Synchronization debug mode is a prototype feature and does not yet detect all synchronizing operations")
    sync = _warning("called a synchronizing CUDA operation")
    other = _warning("something else")
    assert first_sync([notice]) is None
    assert first_sync([notice, other]) is None
    assert first_sync([notice, sync]) == "called a synchronizing CUDA operation at model.py:7"
    assert others([notice, sync, other]) == [other]


def test_a_host_sync_seen_in_warm_up_falls_back_before_any_capture():
    step, _ = graph_step(2, fail="must not be reached", syncs=[None, "called a synchronizing CUDA operation at model.py:3"])
    ours, t = make([DevicePreload(), step])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        h = t.fit(ragged_pairs(n=42), 2, batch_size=4)
    messages = graph_warnings(record)
    assert len(messages) == 1 and "host-device sync (called a synchronizing CUDA operation at model.py:3)" in messages[0]
    assert ".item()" in messages[0]
    ref, t_ref = make([DevicePreload()])
    h_ref = t_ref.fit(ragged_pairs(n=42), 2, batch_size=4)
    assert h.losses == h_ref.losses and identical(ours, ref)


def test_a_changed_learning_rate_is_captured_again():
    """A Python lr is frozen into a graph: changing it drops the graphs (one warning) and training follows the new lr."""
    step, backend = graph_step(1)
    ours, t = make([DevicePreload(), step])
    graphs = backend.graphs
    t.fit(ragged_pairs(n=42), 1, batch_size=4)
    captured = len(graphs)
    t.optimizer.param_groups[0]["lr"] = 3e-3
    with pytest.warns(UserWarning, match="the optimizer changed.*captured again"):
        h = t.fit(ragged_pairs(n=42), 2, batch_size=4)
    assert len(graphs) > captured
    ref, t_ref = make([DevicePreload()])
    t_ref.fit(ragged_pairs(n=42), 1, batch_size=4)
    t_ref.optimizer.param_groups[0]["lr"] = 3e-3
    h_ref = t_ref.fit(ragged_pairs(n=42), 2, batch_size=4)
    assert h.losses == h_ref.losses and identical(ours, ref)


def test_a_schedule_changes_the_lr_without_a_new_capture():
    """The lr becomes a device tensor the scheduler fills in place: graphs stay, training follows the schedule."""
    from hlbd_fast.schedules import warmup_cosine

    step, backend = graph_step(1)
    torch.manual_seed(0)
    ours = TinySeq2Seq(dropout=0.0)
    ref = clone(ours)
    t = FastTrainer(ours, strategies=[DevicePreload(), step], seed=6, progress=False, lr=1e-3, scheduler=warmup_cosine(4, 40))
    backend.trainer = t
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no re-capture warning
        h = t.fit(ragged_pairs(n=42), 3, batch_size=4)
    assert isinstance(t.optimizer.param_groups[0]["lr"], torch.Tensor) and step.graphing
    assert len(backend.graphs) == 2  # the full steps and the partial last step: captured once each
    h_ref = FastTrainer(ref, strategies=[DevicePreload()], seed=6, progress=False, lr=1e-3, scheduler=warmup_cosine(4, 40)).fit(
        ragged_pairs(n=42), 3, batch_size=4
    )
    assert h.losses == pytest.approx(h_ref.losses, rel=1e-6) and max_rel_diff(ours, ref) < 1e-6
    assert [r.lr for r in h] == pytest.approx([r.lr for r in h_ref])


class PlainSGD(torch.optim.Optimizer):
    """A user optimizer: SGD written by hand, with a ``capturable`` option only when asked; records what each step saw."""

    def __init__(self, params, lr=0.1, capturable=None):
        defaults = {"lr": lr} if capturable is None else {"lr": lr, "capturable": capturable}
        super().__init__(params, defaults)
        self.seen: list[tuple[bool | None, type]] = []  # (capturable, type of lr) at each step

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            self.seen.append((g.get("capturable"), type(g["lr"])))
            for p in g["params"]:
                if p.grad is not None:
                    p.sub_(p.grad * g["lr"])


class BuildsSGD(Strategy):
    """An optimizer role that builds torch's SGD (known only after every setup)."""

    role = "optimizer"

    def build_optimizer(self, trainer, params):
        return torch.optim.SGD(params, lr=0.1)


class RecordsLr(Strategy):
    """The lr each step starts with, by global step (host work outside the step: allowed under capture)."""

    def __init__(self):
        self.lrs: dict[int, float] = {}

    def on_step_start(self, trainer):
        self.lrs[trainer.global_step] = float(trainer.optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize(
    "make, name",
    [(lambda ps: torch.optim.SGD(ps, lr=0.1), "SGD"), (lambda ps: PlainSGD(ps), "PlainSGD"), (lambda ps: torch.optim.Adagrad(ps), "Adagrad")],
)
def test_an_optimizer_without_capturable_groups_is_refused_when_the_trainer_is_built(make, name):
    """A step that reads its lr on the host would be frozen at capture: refused, with the reason and the fix."""
    model = TinySeq2Seq()
    with pytest.raises(
        StrategyConflictError,
        match=rf"CUDAGraphStep cannot capture the step of {name}: its param groups have no 'capturable' option.*"
        r"Use FusedAdamW\(\), torch.optim.Adam or AdamW.*'capturable': True, or train without CUDAGraphStep",
    ):
        FastTrainer(model, optimizer=make(model.parameters()), strategies=[DevicePreload(), CUDAGraphStep(backend=StandInBackend())], progress=False)


def test_an_optimizer_built_by_a_strategy_without_capturable_is_refused_before_any_step():
    """Built after every strategy's setup: refused before the first step trains anything."""
    torch.manual_seed(0)
    model = TinySeq2Seq()
    before = clone(model)
    step = CUDAGraphStep(warmup_steps=1, backend=StandInBackend())
    with pytest.raises(StrategyConflictError, match=r"cannot capture the step of SGD"):
        t = FastTrainer(model, strategies=[DevicePreload(), BuildsSGD(), step], progress=False)
        step.backend.trainer = t
        t.fit(ragged_pairs(n=42), 1, batch_size=4)
    assert identical(model, before)


def test_on_cpu_without_graphs_any_optimizer_is_accepted():
    """The eager step (CPU, no backend given) takes SGD as the plain loop does."""
    model = TinySeq2Seq()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU fallback warning
        t = FastTrainer(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), strategies=[DevicePreload(), CUDAGraphStep()], progress=False)
        t.fit(ragged_pairs(n=8), 1, batch_size=4)


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda ps: torch.optim.Adam(ps, lr=1e-3),
        lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        lambda ps: PlainSGD(ps, capturable=True),
        None,  # FusedAdamW, made capturable by the strategy
    ],
)
def test_capturable_optimizers_are_accepted(optimizer):
    step, backend = graph_step(1)
    torch.manual_seed(0)
    model = TinySeq2Seq()
    extra = [FusedAdamW(lr=1e-3)] if optimizer is None else []
    given = None if optimizer is None else optimizer(model.parameters())
    t = FastTrainer(model, optimizer=given, strategies=[DevicePreload(), *extra, step], progress=False, seed=1)
    backend.trainer = t
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        t.fit(ragged_pairs(n=42), 2, batch_size=4)
    assert step.graphing and len(backend.graphs) == 2


def test_a_resumed_cpu_lr_is_moved_onto_the_device_and_follows_the_schedule():
    """A checkpoint's lr comes back as a tensor that is not float32 on the device (a CUDA run's, once read_checkpoint
    maps it to the CPU; here a float64 one): it is moved onto the device as float32 and the graphs are captured again,
    so the replays step with the scheduled lr, not with the value at capture."""
    data = ragged_pairs(n=42)
    torch.manual_seed(0)
    base = TinySeq2Seq()
    recorder = RecordsLr()
    h_ref = FastTrainer(clone(base), strategies=[DevicePreload(), recorder], seed=6, progress=False, lr=1e-2, scheduler=warmup_cosine(4, 40)).fit(
        data, 3, batch_size=4
    )

    def trainer(model):
        step, backend = graph_step(1)
        t = FastTrainer(model, strategies=[DevicePreload(), step], seed=6, progress=False, lr=1e-2, scheduler=warmup_cosine(4, 40))
        backend.trainer = t
        return t, backend

    first, _ = trainer(clone(base))
    first.fit(data, 1, batch_size=4)
    state = first.state_dict()
    for group in state["optimizer"]["param_groups"]:
        assert isinstance(group["lr"], torch.Tensor)
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float64)
    resumed, backend = trainer(clone(base))
    resumed.load_state_dict(state)
    h = resumed.fit(data, 3, batch_size=4)
    assert len(backend.replayed_lrs) > 10
    for global_step, used in backend.replayed_lrs:  # what the replays stepped with: the schedule's lr of that step
        assert used == pytest.approx(recorder.lrs[global_step], rel=1e-6), global_step
    assert h.losses == pytest.approx(h_ref.losses, rel=1e-5)
    lr = resumed.optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.device == resumed.device and lr.dtype == torch.float32


def test_a_fallback_reverts_capturable_and_the_tensor_lr():
    """After a fallback the eager step runs with the optimizer as it was: capturable off again, the lr a float."""
    data = ragged_pairs(n=42)
    torch.manual_seed(0)
    base = TinySeq2Seq()
    ours, ref = clone(base), clone(base)
    opt = PlainSGD(ours.parameters(), lr=0.1, capturable=False)
    step = CUDAGraphStep(warmup_steps=2, backend=StandInBackend(syncs=[None, "called a synchronizing CUDA operation at model.py:3"], capturable=True))
    t = FastTrainer(ours, optimizer=opt, strategies=[DevicePreload(), step], seed=6, progress=False, scheduler=warmup_cosine(4, 40))
    step.backend.trainer = t
    with pytest.warns(UserWarning, match="CUDAGraphStep: running the eager step instead"):
        h = t.fit(data, 2, batch_size=4)
    assert not step.graphing
    assert opt.seen[:2] == [(True, torch.Tensor)] * 2  # the warm-up steps: switched by the graph path
    assert set(opt.seen[2:]) == {(False, float)}  # every eager step after the fallback: as the optimizer was built
    assert opt.param_groups[0]["capturable"] is False and isinstance(opt.param_groups[0]["lr"], float)
    ref_opt = PlainSGD(ref.parameters(), lr=0.1, capturable=False)
    h_ref = FastTrainer(ref, optimizer=ref_opt, strategies=[DevicePreload()], seed=6, progress=False, scheduler=warmup_cosine(4, 40)).fit(data, 2, batch_size=4)
    assert h.losses == pytest.approx(h_ref.losses, rel=1e-6)
    assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])


# ---------------------------------------------------------------------------- CUDA: the real thing
@pytest.fixture
def fp32_only():
    """No TF32: fp32 matmuls, so eager and replayed steps can be compared tightly."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def reference(dropout: float = 0.0) -> nn.Module:
    from hlbd_fast.models import Seq2SeqTransformer

    torch.manual_seed(0)
    return Seq2SeqTransformer(vocab_size=23, d_model=32, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=64, dropout=dropout, max_length=32).cuda()


EPS = 1e-2  # Adam's eps in the CUDA tests; see train_cuda


def train_cuda(base, strategies, capturable, data=None, epochs=2):
    """Train a copy of ``base`` on the GPU with Adam(lr=1e-3, eps=1e-2).

    The large eps: attention's key biases get a zero gradient in exact arithmetic (softmax
    ignores a shift shared by all keys), and with a tiny eps Adam turns their rounding noise
    into full-size steps, so any rounding difference would look like a large weight difference.
    """
    model = clone(base)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=EPS, capturable=capturable)
    t = FastTrainer(model, optimizer=opt, strategies=strategies, seed=7, progress=False)
    h = t.fit(padded_pairs() if data is None else data, epochs, batch_size=4)
    return model, h


def weight_diff(a: nn.Module, b: nn.Module) -> float:
    """Largest |a - b| over all parameters, relative to the largest |a|."""
    with torch.no_grad():
        num = max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))
        return num / max(float(p.abs().max()) for p in a.parameters())


def assert_same_training(ours, h, reference_run, repeat_run, tol, tol_if_not_repeatable):
    """``tol`` when the eager loop repeats itself bit for bit; else the eager loop's own spread decides."""
    (e1, he1), (e2, he2) = reference_run, repeat_run
    repeatable = identical(e1, e2) and he1.losses == he2.losses
    bound = tol if repeatable else tol_if_not_repeatable
    assert h.losses == pytest.approx(he1.losses, rel=bound, abs=0), f"losses differ beyond {bound:g} (eager repeatable: {repeatable})"
    assert weight_diff(ours, e1) <= bound, f"weights differ by {weight_diff(ours, e1):.2e} (eager repeatable: {repeatable})"


def compare(ours, h, base, strategies_fn, tol=1e-6, tol_if_not_repeatable=1e-5, data=None):
    """Against the eager loop with a capturable Adam (the same optimizer arithmetic as the graph)."""
    runs = [train_cuda(base, strategies_fn(), capturable=True, data=data) for _ in range(2)]
    assert_same_training(ours, h, runs[0], runs[1], tol, tol_if_not_repeatable)


@cuda_test
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_cuda_graph_equals_eager(fp32_only, recwarn, accumulation, dropout):
    base = reference(dropout)

    def strategies():
        return [DevicePreload(), DeferredLossSync(), GradientAccumulation(accumulation)]

    step = CUDAGraphStep(warmup_steps=1)
    ours, h = train_cuda(base, strategies() + [step], capturable=False)  # switched to capturable by the strategy
    assert graph_warnings(recwarn) == [] and step.graphing
    assert step.report().graphs == 2 and step.report().capture_seconds > 0  # full steps and the partial last step
    compare(ours, h, base, strategies)
    # against the default (non-capturable) eager Adam: float rounding of the bias corrections only
    default, h_default = train_cuda(base, strategies(), capturable=False)
    assert h.losses == pytest.approx(h_default.losses, rel=1e-5)
    assert weight_diff(ours, default) < 1e-5
    assert weight_diff(ours, base) > 1e-3


@cuda_test
@pytest.mark.parametrize("accumulation", [1, 2])
def test_cuda_graph_with_trim_buckets(fp32_only, recwarn, accumulation):
    base = reference()
    buckets = (8, 12, 16)

    def strategies():
        return [DevicePreload(), TrimPadding(buckets=buckets), DeferredLossSync(), GradientAccumulation(accumulation)]

    step = CUDAGraphStep(warmup_steps=1)
    ours, h = train_cuda(base, strategies() + [step], capturable=True)
    assert graph_warnings(recwarn) == [] and step.graphing and step.report().graphs >= 2
    assert {k[2] for k in step.shapes()} <= set(buckets) and {k[3] for k in step.shapes()} <= set(buckets)
    if accumulation == 1:
        compare(ours, h, base, strategies)
    else:  # a step's shorter micro-batches are padded up to its longest: equal up to rounding
        compare(ours, h, base, strategies, tol=1e-5)


class ItemInForward(nn.Module):
    """The reference model plus a host read-back in forward, as a hand-written NaN guard would do."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.vocab_size = inner.vocab_size

    def forward(self, src, tgt_in):
        out = self.inner(src, tgt_in)
        if out.abs().max().item() > 1e6:  # a host sync
            out = out / 2
        return out


class SynchronizeInForward(ItemInForward):
    def forward(self, src, tgt_in):
        torch.cuda.synchronize()  # a device-wide wait, not a read-back
        return self.inner(src, tgt_in)


@cuda_test
@pytest.mark.parametrize(
    "wrapper, match",
    [
        (ItemInForward, "host-device sync"),
        # not a read-back, so it may pass warm-up and fail the capture itself; dropout on: a failed
        # capture must leave the CUDA RNG as it was
        (SynchronizeInForward, "host-device sync|capturing the step failed"),
    ],
)
def test_cuda_unsafe_forward_falls_back_with_one_warning(fp32_only, wrapper, match):
    base = wrapper(reference(dropout=0.1))

    def strategies():
        return [DevicePreload(), DeferredLossSync()]

    step = CUDAGraphStep(warmup_steps=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ours, h = train_cuda(base, strategies() + [step], capturable=True)
    messages = graph_warnings(record)
    assert len(messages) == 1 and not step.graphing
    assert re.search(match, messages[0])
    compare(ours, h, base, strategies)


@cuda_test
def test_cuda_graph_under_bf16_autocast(recwarn):
    from hlbd_fast.strategies.precision import MixedPrecision

    base = reference()

    def strategies():
        return [DevicePreload(), DeferredLossSync(), MixedPrecision("bf16")]

    step = CUDAGraphStep(warmup_steps=1)
    ours, h = train_cuda(base, strategies() + [step], capturable=True)
    assert graph_warnings(recwarn) == [] and step.graphing
    compare(ours, h, base, strategies, tol=1e-6, tol_if_not_repeatable=1e-3)


@cuda_test
def test_cuda_graph_with_fused_adamw(fp32_only, recwarn):
    """FusedAdamW built without capturable: the strategy switches it on; same as the eager capturable FusedAdamW."""
    from hlbd_fast.strategies.optim import FusedAdamW

    base = reference()

    def run(strategies):
        model = clone(base)
        h = FastTrainer(model, strategies=strategies, seed=7, progress=False).fit(padded_pairs(), 2, batch_size=4)
        return model, h

    step = CUDAGraphStep(warmup_steps=1)
    ours, h = run([DevicePreload(), DeferredLossSync(), FusedAdamW(lr=1e-3, eps=EPS), step])
    assert graph_warnings(recwarn) == [] and step.graphing and step.report().graphs == 2
    eager = [run([DevicePreload(), DeferredLossSync(), FusedAdamW(lr=1e-3, eps=EPS, capturable=True)]) for _ in range(2)]
    assert_same_training(ours, h, eager[0], eager[1], 1e-6, 1e-5)


@pytest.mark.filterwarnings("ignore:CUDAGraphStep. running the eager step")
def test_every_violation_is_listed_in_one_error():
    """One error names each violation: the missing device batches, the eager read-back, the host step hook."""
    with pytest.raises(StrategyConflictError) as e:
        FastTrainer(TinySeq2Seq(), strategies=[EagerLossSync(), CountsSteps(), CUDAGraphStep()], progress=False)
    lines = str(e.value).splitlines()
    assert lines[0] == "these strategies cannot train together:" and len(lines) == 4
    assert "needs batches already on the device" in lines[1]
    assert "EagerLossSync" in lines[2] and "CountsSteps" in lines[3]


def test_a_device_only_step_hook_is_accepted_under_capture():
    class Counts(CountsSteps):
        step_hook_work = "device"

    FastTrainer(TinySeq2Seq(), strategies=[DevicePreload(), Counts(), CUDAGraphStep(backend=StandInBackend())], progress=False)
