"""CUDA paths that had no CUDA test: TF32, device preloading, buckets, pinned workers, resume with graphs, the doctor, nccl.

Every test here needs a CUDA device and is skipped without one (``pytest -m cuda`` selects
them; ``benchmarks/gpu_check.py`` runs them first). The models are small transformers on
ragged token data; each test states what it compares and its tolerance:

* **exact**: bit for bit, when the plain loop repeats itself bit for bit on this GPU;
  otherwise within the plain loop's own run-to-run spread (:data:`SPREAD`), since some
  CUDA kernels (attention backward) add with atomics in no fixed order;
* **rounding**: the same arithmetic in another order (another device, padded columns
  cut, a checkpoint in between): :data:`ROUNDING` relative on the losses, on the weights
  relative to their largest magnitude;
* **TF32**: inputs of matmuls rounded to a 10-bit mantissa: :data:`TF32_TOL` on the final loss.

Adam's ``eps`` is 1e-2 throughout (as in ``test_cuda_graph.py``): attention's key biases
get a zero gradient in exact arithmetic, and a tiny ``eps`` turns their rounding noise into
full-size steps, which would make any rounding difference look like a large one.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from conftest import clone, ragged_pairs
from torch import nn

from hlbd_fast import DeferredLossSync, FastTrainer, Strategy
from hlbd_fast.strategies.cuda_graph import CUDAGraphStep
from hlbd_fast.strategies.data import DataLoaderWorkers, DevicePreload
from hlbd_fast.strategies.padding import TrimPadding
from hlbd_fast.strategies.tf32 import AllowTF32

ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

EPS = 1e-2  # Adam's eps (see the module docstring)
LR = 1e-3
SPREAD = 1e-5  # the plain loop's own run-to-run spread on a GPU that does not repeat bit for bit
ROUNDING = 1e-4  # fp32 in another order (CPU vs GPU kernels, cut padding, resume), after a few epochs
TF32_TOL = 5e-3  # TF32 vs fp32 final loss: 10-bit mantissa inputs, fp32 accumulation, a few epochs


# ---------------------------------------------------------------------------- helpers
def reference(dropout: float = 0.0) -> nn.Module:
    """A small encoder-decoder transformer on the CPU (initial weights fixed)."""
    from hlbd_fast.models import Seq2SeqTransformer

    torch.manual_seed(0)
    return Seq2SeqTransformer(vocab_size=23, d_model=32, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=64, dropout=dropout, max_length=32)


def padded_pairs(n: int = 42, extra: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged pairs with ``extra`` all-padding columns at the end (something to trim)."""
    src, tgt = ragged_pairs(n=n)
    z = torch.zeros(n, extra, dtype=torch.long)
    return torch.cat([src, z], 1), torch.cat([tgt, z], 1)


def train(
    base: nn.Module, strategies: list[Strategy], device: str = "cuda", epochs: int = 2, data: Any = None, **fit: Any
) -> tuple[nn.Module, Any, FastTrainer]:
    """Train a copy of ``base`` with Adam(lr=1e-3, eps=1e-2), seed 7, micro-batch 4; returns (model, history, trainer)."""
    model = clone(base).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=LR, eps=EPS)
    t = FastTrainer(model, optimizer=opt, strategies=strategies, seed=7, progress=False, device=device)
    h = t.fit(padded_pairs() if data is None else data, epochs, batch_size=4, **fit)
    return model, h, t


def weight_diff(a: nn.Module, b: nn.Module) -> float:
    """Largest |a - b| over all parameters (compared on the CPU), relative to the largest |a|."""
    with torch.no_grad():
        pa = [p.detach().float().cpu() for p in a.parameters()]
        pb = [p.detach().float().cpu() for p in b.parameters()]
        num = max(float((p - q).abs().max()) for p, q in zip(pa, pb))
        return num / max(float(p.abs().max()) for p in pa)


def identical(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p.detach().cpu(), q.detach().cpu()) for p, q in zip(a.parameters(), b.parameters()))


def assert_close_training(ours: tuple[nn.Module, Any], ref: tuple[nn.Module, Any], tol: float) -> None:
    """Losses within ``tol`` (relative) and weights within ``tol`` (relative to the largest weight)."""
    (m, h), (mr, hr) = ours, ref
    assert h.losses == pytest.approx(hr.losses, rel=tol, abs=0), f"losses {h.losses} vs {hr.losses} (tolerance {tol:g})"
    assert weight_diff(m, mr) <= tol, f"weights differ by {weight_diff(m, mr):.2e} (tolerance {tol:g})"


def assert_exact_training(ours: tuple[nn.Module, Any], plain: Callable[[], tuple[nn.Module, Any]]) -> None:
    """Bit for bit when the plain loop repeats itself bit for bit here; else within its own spread."""
    first, second = plain(), plain()
    repeatable = identical(first[0], second[0]) and first[1].losses == second[1].losses
    if repeatable:
        assert ours[1].losses == first[1].losses
        assert identical(ours[0], first[0])
    else:
        assert_close_training(ours, first, SPREAD)


def graph_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "CUDAGraphStep" in str(w.message)]


@pytest.fixture
def fp32_only():
    """TF32 off (fp32 matmuls) for the test; the flags as they were afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- AllowTF32
class FlagsDuringSteps(Strategy):
    """Records the TF32 flags at every step's end (inside the run)."""

    def __init__(self) -> None:
        self.seen: set[tuple[bool, bool]] = set()

    def on_step_end(self, trainer: FastTrainer) -> None:
        self.seen.add((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))


class FailAtStep(Strategy):
    def on_step_end(self, trainer: FastTrainer) -> None:
        if trainer.global_step == 3:
            raise RuntimeError("stop here")


def test_allow_tf32_within_tf32_rounding_of_fp32_and_flags_restored(fp32_only):
    base = reference()
    flags = FlagsDuringSteps()
    tf32 = train(base, [AllowTF32(), DeferredLossSync(), flags], epochs=3)
    assert flags.seen == {(True, True)}, "TF32 was not on during the steps"
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    assert tf32[2].reports()["AllowTF32"].tf32 is True
    fp32 = train(base, [DeferredLossSync()], epochs=3)
    assert fp32[1].losses[-1] < 0.95 * fp32[1].losses[0], "the reference run did not train"
    assert tf32[1].losses[-1] == pytest.approx(fp32[1].losses[-1], rel=TF32_TOL)
    # an error inside the run restores the flags too, and flags that were on stay on
    with pytest.raises(RuntimeError, match="stop here"):
        train(base, [AllowTF32(), FailAtStep()], epochs=1)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    torch.backends.cuda.matmul.allow_tf32 = True
    train(base, [AllowTF32()], epochs=1)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, False)


# ---------------------------------------------------------------------------- DevicePreload and TrimPadding buckets
def test_device_preload_on_cuda_is_the_plain_loop(fp32_only):
    """The plain loop's batches, cut on the device: the CUDA plain loop exactly, the CPU loop up to rounding."""
    base = reference(dropout=0.1)
    preload = DevicePreload()
    model, h, _ = train(base, [preload, DeferredLossSync()])
    assert preload.preloaded is not None and preload.preloaded[0].device.type == "cuda" and preload.loads == 1
    assert_exact_training((model, h), lambda: train(base, [DeferredLossSync()])[:2])
    # without dropout (CPU and CUDA draw different masks): the CPU loop up to rounding
    base0 = reference()
    cuda0 = train(base0, [DevicePreload(), DeferredLossSync()])[:2]
    cpu0 = train(base0, [DeferredLossSync()], device="cpu")[:2]
    assert_close_training(cuda0, cpu0, ROUNDING)


def test_trim_padding_buckets_on_cuda_equal_the_untrimmed_loop(fp32_only):
    """Cut columns are padding in every row and the model masks them: the same training up to rounding."""
    base = reference()
    buckets = (8, 12, 16)
    trim = TrimPadding(buckets=buckets)
    seen: set[tuple[int, int]] = set()

    class Shapes(Strategy):
        def prepare_batch(self, trainer: FastTrainer, batch: Any) -> Any:
            seen.add((batch[0].shape[1], batch[1].shape[1]))
            return batch

    ours = train(base, [DevicePreload(), trim, Shapes(), DeferredLossSync()])[:2]
    assert {s for s, _ in seen} <= set(buckets) | {padded_pairs()[0].shape[1]}
    assert len(seen) >= 2, "the data should fall into several buckets"
    untrimmed = train(base, [DeferredLossSync()])[:2]
    assert_close_training(ours, untrimmed, ROUNDING)
    on_cpu = train(base, [DevicePreload(), TrimPadding(buckets=buckets), DeferredLossSync()], device="cpu")[:2]
    assert_close_training(ours, on_cpu, ROUNDING)


# ---------------------------------------------------------------------------- pinned DataLoaderWorkers
def test_pinned_workers_on_cuda_are_the_plain_loop():
    """Worker processes, pinned batches, copied to the GPU: the plain loop's batches and dropout masks."""
    base = reference(dropout=0.1)
    workers = DataLoaderWorkers(num_workers=1, pin_memory=True)
    try:
        model, h, t = train(base, [workers, DeferredLossSync()])
        first = next(iter(workers.batches(t, t.make_source(padded_pairs(), 4), t.epoch)))
        assert first[0].is_pinned() and first[1].is_pinned(), "batches for a CUDA trainer are pinned"
    finally:
        workers.close()
    assert_exact_training((model, h), lambda: train(base, [DeferredLossSync()])[:2])


# ---------------------------------------------------------------------------- checkpoint + resume with graphs
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_with_captured_graphs_equals_a_straight_run(tmp_path, fp32_only, dropout):
    """1 epoch with CUDAGraphStep and a checkpoint, then a new trainer resumes to 3: the straight 3 epochs, up to rounding."""
    base = reference(dropout)

    def strategies() -> list[Strategy]:
        return [DevicePreload(), DeferredLossSync(), CUDAGraphStep(warmup_steps=1)]

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        straight = train(base, strategies(), epochs=3)
        first = train(base, strategies(), epochs=1, checkpoint_dir=tmp_path)
        assert (tmp_path / "last.pt").exists() and first[2].epoch == 1
        resumed = train(base, strategies(), epochs=3, checkpoint_dir=tmp_path, resume=True)
    assert graph_warnings(record) == []
    for _, _, t in (straight, first, resumed):
        assert t.roles.step.report().fallback is None and t.roles.step.graphing
    assert resumed[2].roles.step.graphs >= 1 and resumed[2].roles.step.report().graphs >= 1
    assert len(resumed[1].losses) == 3
    assert_close_training(resumed[:2], straight[:2], ROUNDING)


# ---------------------------------------------------------------------------- the doctor on the fastest preset
def test_doctor_on_fastest_keeps_the_graphs():
    """The doctor's probe makes no sync inside the captured step: no fallback, graphs captured, a step time."""
    from hlbd_fast.bench import _tiny_model, reference_data
    from hlbd_fast.doctor import diagnose

    data, _ = reference_data(128)
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        d = diagnose(_tiny_model(), data, preset="fastest", device="cuda", steps=5, warmup=2)
    assert graph_warnings(record) == []
    graphs = d.run_info["CUDAGraphStep"]
    assert graphs["fallback"] is None and graphs["graphs"] >= 1, graphs
    assert math.isfinite(d.step_s) and d.step_s > 0 and d.device_s is not None
    assert any("the warm-up ran" in n for n in d.notes)


# ---------------------------------------------------------------------------- nccl, a world of one
@pytest.fixture
def torchrun_env(monkeypatch):
    """torchrun's variables for rank 0 of a world of 1 on a free port; any process group destroyed after."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    assert not dist.is_initialized()
    port = free_port()
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    yield port
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("started_by", ["strategy", "tcp"])
def test_nccl_world_of_one(torchrun_env, fp32_only, started_by):
    """DistributedTraining(backend='nccl') on one GPU: it joins (or starts) the group, trains, and is the plain loop."""
    import torch.distributed as dist

    from hlbd_fast.strategies.distributed import DistributedTraining

    if started_by == "tcp":
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{torchrun_env}", world_size=1, rank=0)
    base = reference()
    s = DistributedTraining(backend="nccl")
    model, h, t = train(base, [s, DeferredLossSync()], epochs=1)
    assert s.active and s.world_size == 1 and s.rank == 0 and dist.get_backend() == "nccl"
    assert isinstance(t.train_model, torch.nn.parallel.DistributedDataParallel)
    assert t.device == torch.device("cuda", 0)
    dist.destroy_process_group()
    assert math.isfinite(h.losses[-1])
    plain = train(base, [DeferredLossSync()], epochs=1)[:2]
    assert_close_training((model, h), plain, SPREAD)


# ---------------------------------------------------------------------------- first use in a fresh process
FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    from hlbd_fast import DeferredLossSync, FastTrainer
    from hlbd_fast.models import Seq2SeqTransformer
    from hlbd_fast.strategies.cuda_graph import CUDAGraphStep
    from hlbd_fast.strategies.data import DevicePreload

    torch.manual_seed(0)
    model = Seq2SeqTransformer(vocab_size=23, d_model=32, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=64,
                               dropout=0.1, max_length=32)
    src = torch.randint(4, 23, (40, 10)); tgt = torch.randint(4, 23, (40, 12)); tgt[:, 0] = 2
    step = CUDAGraphStep(warmup_steps=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t = FastTrainer(model, strategies=[DevicePreload(), DeferredLossSync(), step], device="cuda", seed=0, progress=False)
        h = t.fit((src, tgt), 2, batch_size=8)
    print(json.dumps({"info": {k: str(v) for k, v in t.reports().items()},
                      "graphing": step.graphing, "graphs": step.graphs, "losses": h.losses,
                      "warnings": [str(w.message) for w in record]}))
    """
)


def test_cuda_graph_captures_on_first_use_in_a_fresh_process():
    """The first sync-debug use of a process prints torch's one-time notice; it is not a sync, so the step is captured."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "cuda_graph_fallback" not in out["info"], out["info"]["cuda_graph_fallback"]
    assert out["graphing"] and out["info"].get("cuda_graphs", 0) >= 1 and out["graphs"] >= 1
    assert not [w for w in out["warnings"] if "CUDAGraphStep" in w], out["warnings"]
    assert all(math.isfinite(x) for x in out["losses"])
