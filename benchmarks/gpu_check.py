"""One call on a CUDA machine that cannot pass silently: the CUDA tests, the presets against the original loop, the doctor.

    python benchmarks/gpu_check.py --cpu-dry-run   # first, on any machine: every stage on the CPU, tiny (~30 s)
    python benchmarks/gpu_check.py [--out DIR]     # on the GPU: the default run, planned at 295 s (<= 5 min)
    python benchmarks/gpu_check.py --only quick    # rerun one stage (and the rows it is compared with)
    python benchmarks/gpu_check.py --only extreme  # the opt-in max-autotune row: up to 240 s more (see --extreme)

DIR defaults to $OUT, else gpu_check_results.

**Time.** Every stage has a time limit in :data:`STAGES` (the table below the imports): the
most it may take, its child process's start and kill included. The default run plans
:data:`STARTUP_S` plus the default stages' limits, **295 s on an H100/H200** (<= 300 s:
``tests/test_gpu_check.py`` checks the sum), so that a 15-minute device window holds the
run, a look at its table and a full rerun. The limits, with typical times estimated on an
H200 (this script was written on a machine without a GPU: first runs should check them):
CUDA tests 150 s (estimated 120–170 s); each of the five rows 20 s (process start, then as
many epochs as fit: a row starts no epoch it predicts would end past its limit, and its
figures are extrapolated to ``--epochs``); the doctor 35 s (25–40 s). A stage that hits its
limit is killed there and recorded as such in the tables and the JSON, with what it had
measured (the CUDA tests finished, read from the streamed log; a row's epochs, written
after each; the doctor's checks done), never silently missing. ``--limit NAME=SECONDS``
changes one limit (e.g. to rerun the CUDA tests alone with more time); ``--budget`` caps the
whole call (default: the plan), and a stage gets less than its limit only when the stages
after it would not fit otherwise (:class:`Clock`). On the device tool, give the default run
a command timeout of about 330 s (the plan and some slack; if the tool stops the call
earlier with SIGTERM, the tables still come, see **Output**).

``extreme`` (``Compile("max-autotune")``: minutes of compilation) is **opt-in**:
``--extreme`` adds it last, with up to 240 s (the call then plans 535 s of the device
tool's 600 s per command, and leaves no time to rerun in a 15-minute window); better run it
alone after a default run has passed, as ``--only extreme`` (about 270 s: the baseline row
it is compared with, then extreme).

**Stages**, each in its own child process (process-wide state — torch's one-time sync-debug
notice, the sync-debug mode, the TF32 flags, compiled code — never leaks from one into the
next), with ``gpu_check.json`` written after every one so that a later stage that fails or
hits its limit never loses an earlier stage's results:

1. ``cuda tests``: ``pytest -m cuda -v`` over ``tests`` (its log streams to ``cuda_tests.log``);
2. one row per child, every row from the same initial weights and sample order:
   ``baseline`` (the original HLBD loop, a few epochs: its seconds per epoch measured, its
   50-epoch time extrapolated), ``quick``, ``fastest``, ``fastest without CUDAGraphStep``
   (the graph's own gain) and ``fastest without buckets``;
3. ``doctor``: ``hlbd_fast.doctor`` on the reference model: under ``fastest`` (its CUDA graphs
   must survive the doctor), under ``baseline`` (it must count the loop's 8 loss read-backs
   per step) and with DeferredLossSync;
4. ``extreme``: only with ``--extreme`` or ``--only extreme``.

**Rerunning.** ``--only NAME[,NAME...]`` runs just those stages (names as in :data:`STAGES`,
case and ``_``/``-`` for spaces ignored), plus the rows a selected row's loss is compared
with (``--only "fastest without CUDAGraphStep"`` also runs ``fastest`` and ``baseline``); the
stages not selected are listed as SKIP. ``--skip-tests`` leaves out the CUDA tests.

**Output.** Progress goes to stderr; at the end, on stdout: the doctor's reports, the stage
times (limit, seconds taken, outcome), the speed table, and **the checks table last** —
also when a stage failed or hit its limit, or the call was stopped by SIGTERM (the stage
running is killed, the ones left are reported as not run) — so the tail of the output holds
it. ``--fail-stage NAME`` / ``--stall-stage NAME`` (testing only) make a stage's child fail /
hang after its first epoch or check, to check exactly that.

**Exit status** (:func:`verdict`): 0 only when nothing below happened, else 1, and the
last table says why: a CUDA test failed, errored or timed out (or none passed on CUDA); a
required row failed, timed out or was not run; a ``CUDAGraphStep`` fell back
(``cuda_graph_fallback`` in :func:`run_info`), or a row that should capture graphs captured
none; a row's final loss differs from its reference's beyond its tolerance (:data:`PLANS`,
compared at the same epoch count: the baseline's few epochs); a doctor check failed.
Without CUDA (and without ``--cpu-dry-run``) the status is 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

_STARTED = time.perf_counter()  # the call's clock starts before torch is imported (part of STARTUP_S)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing the package


@dataclass(frozen=True)
class Stage:
    """A stage of the call and its time limit: the most it may take, its child's start and kill included."""

    name: str
    limit_s: float  # on an H100/H200
    dry_limit_s: float  # with --cpu-dry-run (tiny model on the CPU; generous: the CPU may be shared)
    estimate: str  # typical time on an H200 (an estimate until measured)
    default: bool = True  # in the default run; extreme only with --extreme (or --only extreme)


#: THE TIME TABLE, in the order the stages run. The default run plans STARTUP_S + the default
#: stages' limit_s: 10 + 150 + 5 x 20 + 35 = 295 s (<= 300 s, checked by tests/test_gpu_check.py).
STARTUP_S = 10.0  # the parent's own start (python, torch, CUDA context) and its report at the end
STAGES: tuple[Stage, ...] = (
    #      name                            limit_s  dry_limit_s  estimate on an H200
    Stage("cuda tests", 150.0, 90.0, "120-170 s (25 tests, some in subprocesses, one inductor compile)"),
    Stage("baseline", 20.0, 30.0, "~5 s start + 3 epochs of the original loop"),
    Stage("quick", 20.0, 30.0, "~5 s start, then epochs until the limit"),
    Stage("fastest", 20.0, 30.0, "~5 s start + graph captures, then epochs until the limit"),
    Stage("fastest without CUDAGraphStep", 20.0, 30.0, "~5 s start, then epochs until the limit"),
    Stage("fastest without buckets", 20.0, 30.0, "~5 s start + graph captures, then epochs until the limit"),
    Stage("doctor", 35.0, 60.0, "25-40 s (3 checks of 5 steps)"),
    Stage("extreme", 240.0, 10.0, "minutes of max-autotune compilation", default=False),
)
STAGE_LIMITS_S: dict[str, float] = {s.name: s.limit_s for s in STAGES}
DEFAULT_PLAN_S = STARTUP_S + sum(s.limit_s for s in STAGES if s.default)  # 295 s
ROW_MARGIN_S = 5.0  # a row's child is told its limit less this: its start before its clock runs (python, torch)
MIN_STAGE_S = 15.0  # a stage is not started with less than this (or its limit, if smaller) left for it
DRY_RUN = {"epochs": 2, "baseline_epochs": 2, "tests": ["tests/test_cuda_paths.py"]}


@dataclass(frozen=True)
class RowPlan:
    """A row of stage 2 (its time limit is its :data:`STAGES` entry), and what its final loss is compared with."""

    name: str
    reference: str | None = None  # the row its final loss is compared with, at the same epoch count
    tolerance: float | None = None  # largest |loss - reference's| / reference's
    why: str = ""  # where the tolerance comes from
    graphs: bool = False  # on CUDA it must capture at least one CUDA graph
    required: bool = True  # not run, timed out or failed: the check fails


#: The rows. Tolerances: on this project's CPU, 3 epochs of the reference model, the original
#: loop (micro-batch 4 x 8, mean of micro-batch means) and fastest's computation without
#: graphs and TF32 (micro-batch 32, token-weighted mean, buckets, fused AdamW, other dropout
#: masks) ended 0.03% apart (6.5456 vs 6.5478): the presets train the same samples per step in
#: the same order, and differ in micro-batch split, loss weighting, rounding and dropout masks.
PLANS: tuple[RowPlan, ...] = (
    RowPlan("baseline", why="the reference: the original HLBD loop"),
    RowPlan(
        "quick",
        "baseline",
        0.02,
        "same 32 samples per step (16 x 2), token-weighted loss, other dropout masks, and bf16 autocast (the precision tests allow 0.5% on their own): 2%",
    ),
    RowPlan(
        "fastest",
        "baseline",
        0.01,
        "same 32 samples per step in one micro-batch, token-weighted loss, other dropout masks (0.03% measured on CPU), TF32 matmuls: 1%",
        graphs=True,
    ),
    RowPlan(
        "fastest without CUDAGraphStep",
        "fastest",
        0.01,
        "the same steps eagerly: same batches, shapes and dropout masks (graph-safe RNG), so rounding only "
        "(capturable Adam, reduction order); 1% also absorbs another dropout stream, while a graph that replays "
        "stale inputs or skips updates moves the loss far more",
    ),
    RowPlan(
        "fastest without buckets", "baseline", 0.01, "as fastest, padding cut to multiples of 8 instead of buckets (other shapes, other masks): 1%", graphs=True
    ),
)
EXTREME = RowPlan("extreme", "baseline", 0.02, "batch 32, bf16 autocast, compiled (max-autotune), token-weighted loss: 2%", required=False)
ROW_PLANS: dict[str, RowPlan] = {p.name: p for p in (*PLANS, EXTREME)}
assert [s.name for s in STAGES] == ["cuda tests", *(p.name for p in PLANS), "doctor", EXTREME.name]


# ---------------------------------------------------------------------------- time
class Clock:
    """The call's time budget: what is left, and what a stage may take without starving the stages after it."""

    def __init__(self, budget_s: float, started: float | None = None) -> None:
        self.budget_s = budget_s
        self.started = time.perf_counter() if started is None else started

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def allot(self, cap_s: float, reserve_s: float = 0.0) -> float:
        """Seconds for the next stage: at most ``cap_s``, leaving ``reserve_s`` for the stages after it (may be < 0)."""
        return min(cap_s, self.left() - reserve_s)


# ---------------------------------------------------------------------------- children
def _child_env() -> dict[str, str]:
    """The package from this checkout; unbuffered output, so a killed child's log holds everything it printed."""
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")


def run_child(cmd: list[str], timeout_s: float, log_path: Path) -> dict[str, Any]:
    """Run ``cmd`` in its own session with its output streaming to ``log_path``; kill the whole session at ``timeout_s``.

    Returns ``returncode`` (``None`` when killed), ``timed_out`` and ``seconds``.
    """
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_child_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            _kill_session(proc)
            rc = None
        except BaseException:  # the parent stopped (SIGTERM, Ctrl-C): no child outlives it
            _kill_session(proc)
            raise
    return {"returncode": rc, "timed_out": rc is None, "seconds": round(time.perf_counter() - t0, 1)}


def _kill_session(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # pytest's own children (subprocess tests) too
    proc.wait()


def _tail(path: Path, lines: int = 30) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [line for line in text.strip().splitlines() if line.strip()][-lines:]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (a reader never sees half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False, default=str)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- stage 1: the CUDA tests
_OUTCOME = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)")


def parse_pytest_log(lines: list[str]) -> dict[str, Any]:
    """Outcome counts from ``pytest -v`` output, complete or cut short; the test running when it was cut, if any."""
    counts: dict[str, int] = {}
    failed: list[str] = []
    running, in_tests = None, True
    for line in lines:
        m = _OUTCOME.match(line.strip())
        if m:
            key = m.group(2).lower()
            counts[key] = counts.get(key, 0) + 1
            if key in ("failed", "error"):
                failed.append(m.group(1))
            running = None
        elif line.startswith("=") and "test session starts" not in line:
            in_tests = False  # the reports after the tests (failures, warnings summary) name tests too
        elif in_tests and line.strip() and "::" in line.split()[0]:
            running = line.split()[0]
    summary = next((ln for ln in reversed(lines) if _COUNT.search(ln) and ln.strip().startswith("=")), "")
    if summary:  # pytest's own final counts win over the per-line ones (collection errors count there only)
        counts = {("error" if k.startswith("error") else k): int(n) for n, k in _COUNT.findall(summary)}
    return {"counts": counts, "failed_tests": failed[:20], "running_when_stopped": running, "summary": summary.strip("= ")}


#: What ``--fail-stage "cuda tests"`` / ``--stall-stage "cuda tests"`` run instead of pytest (testing this script):
#: a test passes, then one fails (exit 1), or one hangs until the stage's limit kills it.
_TESTS_FAULT = {
    "fail": "print('tests/gpu_check_fault.py::test_one PASSED'); print('tests/gpu_check_fault.py::test_failing_on_purpose "
    "FAILED'); print('=== 1 failed, 1 passed in 0.01s (--fail-stage) ==='); raise SystemExit(1)",
    "stall": "import time; print('tests/gpu_check_fault.py::test_one PASSED'); print('tests/gpu_check_fault.py::"
    "test_hanging_on_purpose ', flush=True); time.sleep(10**6)",
}


def run_cuda_tests(paths: list[str], timeout_s: float, out: Path, fault: str | None = None) -> dict[str, Any]:
    """``pytest -m cuda -v`` over ``paths``, killed at ``timeout_s``; counts read from its streamed log (also when killed)."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-p", "no:cacheprovider", "--durations=10", *paths]
    if fault:
        cmd = [sys.executable, "-c", _TESTS_FAULT[fault]]
    run = run_child(cmd, timeout_s, out / "cuda_tests.log")
    return {"command": " ".join(cmd[1:]), **collect_tests(out, timeout_s, run)}


def collect_tests(out: Path, timeout_s: float, run: dict[str, Any] | None, broken: str | None = None) -> dict[str, Any]:
    """The CUDA-test stage as its log shows it (the tests finished, the one running when it was cut), and how it ended."""
    lines = _tail(out / "cuda_tests.log", 100000)
    parsed = parse_pytest_log(lines)
    run = run or {"returncode": None, "timed_out": False, "seconds": None}
    return {"timeout_s": round(timeout_s), **run, **parsed, **({"error": broken} if broken else {}), "tail": lines[-40:]}


# ---------------------------------------------------------------------------- stage 2: the rows (child side)
def _inputs(dry: bool) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.nn.Module]:
    """The data and the initial model, the same in every child (built under ``torch.manual_seed(0)``)."""
    from hlbd_fast.bench import _tiny_model, reference_data
    from hlbd_fast.models import Seq2SeqTransformer

    data, vocab = reference_data(64 if dry else None)
    torch.manual_seed(0)
    model = _tiny_model() if dry else Seq2SeqTransformer(vocab_size=max(vocab, 5000))
    return data, model


def row_spec(name: str, device: torch.device) -> Any:
    """The :class:`~hlbd_fast.bench.RowSpec` of a row: a bench row, or ``fastest`` without one of its parts."""
    import dataclasses

    from hlbd_fast.bench import ROWS, RowSpec
    from hlbd_fast.presets import get_preset
    from hlbd_fast.strategies.cuda_graph import CUDAGraphStep
    from hlbd_fast.strategies.padding import TrimPadding

    if name in ROWS:
        return ROWS[name](device)
    preset = get_preset("fastest", device=device)
    kept, notes = [], []
    for s in preset.strategies:
        if name == "fastest without CUDAGraphStep" and isinstance(s, CUDAGraphStep):
            notes.append(f"without {s!r}")
        elif name == "fastest without buckets" and isinstance(s, TrimPadding) and s.buckets:
            kept.append(TrimPadding(multiple_of=s.multiple_of, check=s.check))
            notes.append(f"TrimPadding(multiple_of={s.multiple_of}) instead of buckets {s.buckets}")
        else:
            kept.append(s)
    if name not in ("fastest without CUDAGraphStep", "fastest without buckets"):
        raise ValueError(f"unknown row {name!r}")
    note = "; ".join(notes) or f"nothing to remove on {device.type}: the same as fastest"
    return RowSpec(dataclasses.replace(preset, name=name, strategies=tuple(kept)), note)


def flat_info(info: dict[str, Any]) -> dict[str, Any]:
    """Run-level figures, JSON-ready, under the names the checks read (``cuda_graphs``, ``capture_seconds``,
    ``cuda_graph_fallback``, ``compile_seconds``, ``compile_fallback``...), from either form a run gives them in:
    strategy reports by class name (``trainer.reports()``, or the doctor's ``run_info``: dataclasses or their
    dicts), or the flat ``history.info`` of older trainers (kept as it is)."""
    import dataclasses

    out: dict[str, Any] = {}
    for key, rep in info.items():
        if dataclasses.is_dataclass(rep) and not isinstance(rep, type):
            rep = dataclasses.asdict(rep)
        if not isinstance(rep, dict):
            out[str(key)] = rep
            continue
        kind = str(key).split("#")[0]
        if kind == "CUDAGraphStep":
            out.update(cuda_graphs=rep.get("graphs"), capture_seconds=rep.get("capture_seconds"))
            if rep.get("fallback"):
                out["cuda_graph_fallback"] = rep["fallback"]
        elif kind == "Compile":
            out.update(compile_seconds=rep.get("compile_seconds"), graph_breaks=len(rep.get("graph_breaks") or []), recompiles=len(rep.get("recompiles") or []))
            if rep.get("compile_fallback"):
                out["compile_fallback"] = rep["compile_fallback"]
        else:
            out[str(key)] = rep
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in out.items()}


def run_info(trainer: Any) -> dict[str, Any]:
    """:func:`flat_info` of a trainer: its ``history.info`` where it has one, else its strategies' ``reports()``."""
    legacy = getattr(trainer.history, "info", None)
    if isinstance(legacy, dict):
        return flat_info(legacy)
    return flat_info(trainer.reports() if callable(getattr(trainer, "reports", None)) else {})


def _row_figures(row: dict[str, Any], trainer: Any, caught: list[warnings.WarningMessage], device: torch.device) -> None:
    """The row's figures after an epoch (what the parent needs to compare and to print)."""
    h = trainer.history
    steps = sum(r.optimizer_steps for r in h.records)
    row.update(
        epochs=len(h.records),
        losses=h.losses,
        epoch_seconds=h.seconds,
        info=run_info(trainer),
        syncs_per_step=trainer.loss_reads / steps if steps else None,
        peak_mem_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        warnings=sorted({f"{w.category.__name__}: {w.message}".splitlines()[0] for w in caught})[:8],
    )


def _fault(fault: str | None, where: str) -> None:
    """``--fail-stage`` / ``--stall-stage`` on the child side (testing this script): fail here, or hang until killed."""
    if fault == "fail":
        raise RuntimeError(f"failed on purpose after {where} (--fail-stage)")
    if fault == "stall":
        print(f"gpu_check: stalling on purpose after {where} (--stall-stage)", flush=True)
        time.sleep(10**6)


def train_row(name: str, epochs: int, seconds: float, out_file: Path, dry: bool, fault: str | None = None) -> int:
    """Child side of a row: train epoch by epoch, writing the figures after each.

    The first epoch always runs; no later epoch starts when it would end past ``seconds``
    (predicted from the last epoch's time): the parent kills the child at its limit.
    """
    from hlbd_fast import FastTrainer

    started = time.perf_counter()
    device = torch.device("cpu" if dry else "cuda")
    row: dict[str, Any] = {"name": name, "epochs_planned": epochs, "epochs": 0, "losses": [], "error": None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            data, initial = _inputs(dry)
            spec = row_spec(name, device)
            row.update(note=spec.note, strategies=[repr(s) for s in spec.preset.strategies], micro_batch=spec.preset.batch_size)
            trainer = FastTrainer.from_preset(initial, spec.preset, device=device, seed=0, progress=False)
            row["accumulation"] = trainer.accumulation
            last_s = 0.0
            while trainer.epoch < epochs:
                if trainer.epoch and time.perf_counter() - started + last_s > seconds:
                    row["stopped"] = f"stopped after {trainer.epoch} of {epochs} epochs: another ({last_s:.1f} s) would end past the row's {seconds:.0f} s"
                    break
                t0 = time.perf_counter()
                trainer.fit(data, epochs=trainer.epoch + 1)
                last_s = time.perf_counter() - t0
                _row_figures(row, trainer, caught, device)
                write_json(out_file, row)
                if trainer.epoch == 1:
                    _fault(fault, "the first epoch")
        except Exception as e:  # noqa: BLE001 - reported in the row, the parent decides
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    write_json(out_file, row)
    return 0 if row["error"] is None else 1


# ---------------------------------------------------------------------------- stage 2: the rows (parent side)
def _row_files(plan: RowPlan, out: Path) -> tuple[Path, Path]:
    slug = re.sub(r"[^a-z0-9]+", "_", plan.name.lower()).strip("_")
    return out / f"row_{slug}.json", out / f"row_{slug}.log"


def run_row(plan: RowPlan, epochs: int, limit_s: float, out: Path, dry: bool, fault: str | None = None) -> dict[str, Any]:
    """One row in its own child process, killed at ``limit_s``; its result carries its plan (tolerance, reference...).

    The child is told ``limit_s`` less :data:`ROW_MARGIN_S` (its own start comes before its
    clock runs). Killed, the row keeps the epochs it had written and says it hit its limit.
    """
    out_file, log = _row_files(plan, out)
    out_file.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--row",
        plan.name,
        "--row-out",
        str(out_file),
        "--epochs",
        str(epochs),
        "--row-seconds",
        f"{max(limit_s - ROW_MARGIN_S, 1.0):.1f}",
    ]
    cmd += (["--cpu-dry-run"] if dry else []) + (["--child-fault", fault] if fault else [])
    return collect_row(plan, out, limit_s, run_child(cmd, limit_s, log))


def collect_row(plan: RowPlan, out: Path, limit_s: float, run: dict[str, Any] | None, broken: str | None = None) -> dict[str, Any]:
    """The row as its child left it (the epochs it wrote), with how it ended: done, failed, killed at its limit, ``broken``."""
    out_file, log = _row_files(plan, out)
    row = _read_json(out_file) or {"name": plan.name, "epochs": 0, "losses": []}
    row.setdefault("error", None)
    if broken:
        row["error"] = broken
    elif run and run["timed_out"]:
        n = row.get("epochs", 0)
        row["timed_out"] = f"hit its {limit_s:.0f} s limit: killed after {run['seconds']:.0f} s, {n} epoch{'' if n == 1 else 's'} measured"
    elif run and row.get("error") is None and run["returncode"] != 0:
        row["error"] = f"the row's process failed (exit {run['returncode']}): " + " | ".join(_tail(log, 3))
    row.update(plan=asdict(plan), wall_s=run and run["seconds"], cap_s=round(limit_s, 1), log_tail=_tail(log, 10))
    return _with_speed(row)


def _with_speed(row: dict[str, Any]) -> dict[str, Any]:
    """Seconds per epoch (median after the first epoch) and one-off seconds (compile, capture)."""
    secs = row.get("epoch_seconds") or []
    row["s_per_epoch"] = statistics.median(secs[1:] or secs) if secs else None
    info = row.get("info") or {}
    one_off = [float(info[k]) for k in ("compile_seconds", "capture_seconds") if isinstance(info.get(k), (int, float))]
    row["one_off_s"] = sum(one_off) if one_off else None
    return row


def skipped_row(plan: RowPlan, why: str, deselected: bool = False) -> dict[str, Any]:
    """A row that was not run (``why`` says so in the table); ``deselected``: left out on purpose (never a failure)."""
    row = {"name": plan.name, "epochs": 0, "losses": [], "error": None, "skipped": why, "plan": asdict(plan), "s_per_epoch": None, "one_off_s": None}
    if deselected:
        row["deselected"] = True
    return row


# ---------------------------------------------------------------------------- stage 3: the doctor (child side)
def doctor_checks(out_file: Path, dry: bool, fault: str | None = None) -> int:
    """Child side of stage 3: each check's figures written as soon as it is done."""
    from hlbd_fast.strategies.sync import DeferredLossSync

    device = torch.device("cpu" if dry else "cuda")
    checks: list[dict[str, Any]] = []
    plan: tuple[tuple[str, dict[str, Any], Callable[[Any], str | None]], ...] = (
        # first in this process: the first sync-debug use is CUDAGraphStep's own, under the doctor
        ("doctor: fastest", {"preset": "fastest"}, lambda d: _graph_kept(d, dry)),
        (
            "doctor: baseline preset",
            {"preset": "baseline"},
            lambda d: None if (d.syncs_per_step or 0) >= 8 else f"found {d.syncs_per_step} syncs per step, expected >= 8",
        ),
        ("doctor: batch 32 + DeferredLossSync", {"strategies": [DeferredLossSync()], "batch_size": 32}, lambda d: None),
    )
    for name, kwargs, judge in plan:
        checks.append(_one_doctor_check(name, kwargs, judge, device, dry))
        write_json(out_file, {"checks": checks})
        if len(checks) == 1:
            _fault(fault, "the first doctor check")
    return 0


def _graph_kept(d: Any, dry: bool) -> str | None:
    """Why the doctor's run under ``fastest`` is wrong, or ``None``: no fallback, graphs on CUDA, a step time."""
    info = flat_info(d.run_info or {})
    fallback = info.get("cuda_graph_fallback")
    if fallback:
        return f"CUDAGraphStep fell back under the doctor: {fallback}"
    if not dry and not info.get("cuda_graphs"):
        return "no CUDA graph was captured under the doctor"
    return None if math.isfinite(d.step_s) and d.step_s > 0 else f"no step time ({d.step_s})"


def _one_doctor_check(name: str, kwargs: dict[str, Any], judge: Callable[[Any], str | None], device: torch.device, dry: bool) -> dict[str, Any]:
    from hlbd_fast.doctor import diagnose

    t0 = time.perf_counter()
    try:
        data, model = _inputs(dry)
        d = diagnose(model, data, steps=2 if dry else 5, warmup=1 if dry else 2, device=device, **kwargs)
        problem = judge(d)
        return {
            "name": name,
            "ok": problem is None,
            "problem": problem,
            "syncs_per_step": d.syncs_per_step,
            "step_ms": d.step_s * 1e3,
            "device_ms": None if d.device_s is None else d.device_s * 1e3,
            "run_info": flat_info(d.run_info or {}),
            "report": str(d),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    except Exception as e:  # noqa: BLE001 - reported, the other checks still run
        return {"name": name, "ok": False, "problem": f"{type(e).__name__}: {e}".splitlines()[0][:300], "seconds": round(time.perf_counter() - t0, 1)}


def run_doctor(timeout_s: float, out: Path, dry: bool, fault: str | None = None) -> list[dict[str, Any]]:
    """Stage 3 in one child process, killed at ``timeout_s``; the checks done are kept, one not reached is a failure."""
    (out / "doctor.json").unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--doctor-out", str(out / "doctor.json")]
    cmd += (["--cpu-dry-run"] if dry else []) + (["--child-fault", fault] if fault else [])
    return collect_doctor(out, timeout_s, run_child(cmd, timeout_s, out / "doctor.log"))


def collect_doctor(out: Path, timeout_s: float, run: dict[str, Any] | None, broken: str | None = None) -> list[dict[str, Any]]:
    """The doctor checks its child wrote, and a failed entry for those it did not reach (and why)."""
    checks = (_read_json(out / "doctor.json") or {}).get("checks") or []
    if broken or run is None or run["timed_out"] or run["returncode"] != 0 or len(checks) < 3:
        if broken or run is None:
            why = broken or "not run"
        elif run["timed_out"]:
            why = f"hit its {timeout_s:.0f} s limit: killed after {run['seconds']:.0f} s"
        else:
            why = f"its process ended (exit {run['returncode']})"
        checks.append(
            {
                "name": "doctor (checks not reached)",
                "ok": False,
                "timed_out": bool(run and run["timed_out"]),
                "problem": f"{why} after {len(checks)} of 3 checks: " + " | ".join(_tail(out / "doctor.log", 3)),
            }
        )
    return checks


# ---------------------------------------------------------------------------- the verdict
def loss_check(row: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row's final loss against its reference row's, at the epochs both have; ``None`` when the row has no reference."""
    plan = row.get("plan") or {}
    ref_name, tol = plan.get("reference"), plan.get("tolerance")
    if not ref_name or tol is None:
        return None
    ref = next((r for r in rows if r.get("name") == ref_name), None)
    mine, theirs = row.get("losses") or [], (ref or {}).get("losses") or []
    if not mine or not theirs:
        return {
            "reference": ref_name,
            "tolerance": tol,
            "ok": False,
            "epoch": None,
            "rel_diff": None,
            "problem": f"no final loss to compare ({row['name'] if not mine else ref_name} has none)",
        }
    k = min(len(mine), len(theirs))
    a, b = mine[k - 1], theirs[k - 1]
    diff = abs(a - b) / abs(b) if b and math.isfinite(a) and math.isfinite(b) else float("inf")
    ok = diff <= tol
    problem = None if ok else (f"final loss {a:.4f} at epoch {k} is {_pct(diff)} from {ref_name}'s {b:.4f} (tolerance {_pct(tol)})")
    return {"reference": ref_name, "tolerance": tol, "ok": ok, "epoch": k, "rel_diff": diff, "problem": problem}


def _pct(x: float) -> str:
    return "inf" if not math.isfinite(x) else f"{100 * x:.2f}%"


def cuda_test_problems(tests: dict[str, Any] | None, dry: bool) -> list[str]:
    """Why the CUDA-test stage fails the check (empty: it passes; ``None`` or ``deselected``: left out on purpose)."""
    if tests is None or tests.get("deselected"):
        return []
    if tests.get("skipped"):
        return [f"CUDA tests not run: {tests['skipped']}"]
    counts = tests.get("counts") or {}
    problems = [f"CUDA tests: {tests['error']}"] if tests.get("error") else []
    if tests.get("timed_out"):
        where = f" while running {tests['running_when_stopped']}" if tests.get("running_when_stopped") else ""
        limit = f" (its limit: {tests['timeout_s']} s)" if tests.get("timeout_s") is not None else ""
        problems.append(f"CUDA tests timed out after {tests.get('seconds')} s{where}; {counts.get('passed', 0)} passed before{limit}")
    bad = counts.get("failed", 0) + counts.get("error", 0)
    if bad:
        problems.append(f"CUDA tests: {bad} failed or errored ({', '.join(tests.get('failed_tests') or []) or tests.get('summary')})")
    elif not tests.get("timed_out") and tests.get("returncode") not in (0, None):
        problems.append(f"CUDA tests: pytest exited {tests['returncode']} ({tests.get('summary') or 'see cuda_tests.log'})")
    if not dry and not counts.get("passed") and not problems:
        problems.append("CUDA tests: none passed (were they all skipped? is CUDA visible to the child?)")
    return problems


def row_problems(row: dict[str, Any], rows: list[dict[str, Any]], dry: bool) -> list[str]:
    """Why a row fails the check (empty: it passes)."""
    plan, name = row.get("plan") or {}, row.get("name")
    required = plan.get("required", True)
    problems = []
    if row.get("deselected"):
        return []
    if row.get("skipped"):
        return [f"{name}: not run ({row['skipped']})"] if required else []
    if row.get("error"):
        problems.append(f"{name}: failed: {row['error']}")
    if row.get("timed_out") and required:
        problems.append(f"{name}: timed out ({row['timed_out']})")
    info = row.get("info") or {}
    if info.get("cuda_graph_fallback"):
        problems.append(f"{name}: CUDAGraphStep fell back to the eager step: {info['cuda_graph_fallback']}")
    elif plan.get("graphs") and not dry and row.get("losses") and not info.get("cuda_graphs"):
        problems.append(f"{name}: captured no CUDA graph")
    if any(not math.isfinite(x) for x in row.get("losses") or []):
        problems.append(f"{name}: a loss is not finite")
    check = loss_check(row, rows)
    if check is not None and not check["ok"] and (row.get("losses") or required):
        problems.append(f"{name}: {check['problem']}")
    return problems


def verdict(result: dict[str, Any]) -> tuple[int, list[str]]:
    """The exit status (0: every check passed, 1: not) and each problem found, from the collected results."""
    dry = bool(result.get("dry_run"))
    problems = cuda_test_problems(result.get("cuda_tests"), dry)
    rows = result.get("rows") or []
    for row in rows:
        problems += row_problems(row, rows, dry)
    for check in result.get("doctor") or []:
        if check.get("ok") is False:
            problems.append(f"{check['name']}: {check.get('problem') or 'failed'}")
    if not rows:
        problems.append("no row was run")
    return (1 if problems else 0), problems


# ---------------------------------------------------------------------------- the tables
def _f(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def speed_table(result: dict[str, Any]) -> list[str]:
    """The rows' figures: speed, extrapolated total, loss, memory, syncs, graphs."""
    epochs = result["config"]["epochs"]
    rows = result.get("rows") or []
    base = next((r for r in rows if r.get("name") == "baseline" and r.get("s_per_epoch")), None)
    out = [
        f"| row | epochs | s/epoch | one-off s | speedup | {epochs}-epoch s | final loss | peak MB | syncs/step | graphs | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        spe = r.get("s_per_epoch")
        total = spe * epochs + (r.get("one_off_s") or 0.0) if spe else None
        speedup = base["s_per_epoch"] / spe if base and spe else None
        info = r.get("info") or {}
        note = r.get("skipped") or r.get("error") or r.get("timed_out") or r.get("stopped") or r.get("note") or ""
        if r.get("epochs") and r.get("epochs") != epochs and not r.get("skipped"):
            note = "; ".join(x for x in (note, f"{epochs}-epoch time extrapolated") if x)
        final = (r.get("losses") or [None])[-1]
        out.append(
            f"| {r['name']} | {r.get('epochs', 0)} | {_f(spe, '.3f')} | {_f(r.get('one_off_s'), '.1f')} | "
            f"{_f(speedup, '.2f')}{'x' if speedup else ''} | {_f(total, '.1f')} | {_f(final, '.4f')} | "
            f"{_f(r.get('peak_mem_mb'), '.0f')} | {_f(r.get('syncs_per_step'), '.3g')} | "
            f"{info.get('cuda_graphs', '-')} | {str(note)[:140]} |"
        )
    return out


def _row_check_line(r: dict[str, Any], rows: list[dict[str, Any]], dry: bool) -> str:
    plan = r.get("plan") or {}
    check = loss_check(r, rows)
    if r.get("skipped"):
        result = r["skipped"]
    elif check and check.get("epoch"):
        result = f"loss {r['losses'][check['epoch'] - 1]:.4f} at epoch {check['epoch']}: {_pct(check['rel_diff'])} from {check['reference']}"
    else:
        result = f"{r.get('epochs', 0)} epochs" + (f", final loss {r['losses'][-1]:.4f}" if r.get("losses") else "")
    said = [x for x in (r.get("stopped"), r.get("timed_out") and f"timed out: {r['timed_out']}") if x]
    if said and not r.get("skipped"):
        result += "; " + "; ".join(said)
    expect = f"<= {_pct(plan['tolerance'])} vs {plan['reference']} ({plan.get('why', '')})" if plan.get("tolerance") is not None else plan.get("why", "")
    if plan.get("graphs"):
        expect += "; on CUDA: graphs captured, no fallback"
    problems = row_problems(r, rows, dry)
    status = "FAIL" if problems else ("SKIP" if r.get("skipped") or (r.get("timed_out") and not plan.get("required", True)) else "PASS")
    return f"| {r['name']} | {result}{'; ' + '; '.join(problems) if problems else ''} | {expect} | {status} |"


def checks_table(result: dict[str, Any], status: int, problems: list[str]) -> list[str]:
    """The last table: every check, its figures, its tolerance or expectation, PASS/FAIL/SKIP, and the overall verdict."""
    dry = bool(result.get("dry_run"))
    out = ["| check | result | tolerance / expectation | status |", "|---|---|---|---|"]
    tests = result.get("cuda_tests")
    if tests is None:
        out.append("| CUDA tests | skipped (--skip-tests) | - | SKIP |")
    elif tests.get("deselected"):
        out.append(f"| CUDA tests | {tests['deselected']} | - | SKIP |")
    else:
        tp = cuda_test_problems(tests, dry)
        summary = tests.get("skipped") or tests.get("summary") or json.dumps(tests.get("counts"))
        out.append(
            f"| CUDA tests (pytest -m cuda) | {summary} ({tests.get('seconds', 0)} s){'; ' + '; '.join(tp) if tp else ''} | "
            f"all pass, within {tests.get('timeout_s', '-')} s | {'FAIL' if tp else 'PASS'} |"
        )
    rows = result.get("rows") or []
    out += [_row_check_line(r, rows, dry) for r in rows]
    for c in result.get("doctor") or []:
        if c.get("skipped"):
            failed = c.get("ok") is False
            out.append(f"| {c['name']} | {c.get('problem') if failed else c['skipped']} | - | {'FAIL' if failed else 'SKIP'} |")
            continue
        figures = f"step {_f(c.get('step_ms'), '.2f')} ms; syncs/step {c.get('syncs_per_step')}"
        graphs = (c.get("run_info") or {}).get("cuda_graphs")
        figures += f"; {graphs} graphs" if graphs is not None else ""
        out.append(
            f"| {c['name']} | {figures}{'; ' + c['problem'] if c.get('problem') else ''} | "
            f"{_DOCTOR_EXPECT.get(c['name'], 'runs')} | {'FAIL' if c.get('ok') is False else 'PASS'} |"
        )
    word = "PASS" if status == 0 else f"FAIL: {len(problems)} problem{'s' if len(problems) != 1 else ''}"
    out.append(f"| **overall** | {'; '.join(problems) or 'every check passed'} | exit status {status} | **{word}** |")
    return out


_DOCTOR_EXPECT = {
    "doctor: fastest": "no CUDAGraphStep fallback under the doctor, graphs captured, a step time",
    "doctor: baseline preset": ">= 8 loss read-backs (host syncs) per step",
    "doctor: batch 32 + DeferredLossSync": "runs (figures for reading)",
}


# ---------------------------------------------------------------------------- the run
def _norm(name: str) -> str:
    return " ".join(re.sub(r"[_\-]+", " ", name).lower().split())


def stage_name(text: str) -> str:
    """The :data:`STAGES` name ``text`` means (case, ``_`` and ``-`` for spaces ignored); ``ValueError`` if none."""
    by_norm = {_norm(s.name): s.name for s in STAGES}
    name = by_norm.get(_norm(text))
    if name is None:
        raise ValueError(f"no stage {text!r}; the stages: {', '.join(repr(s.name) for s in STAGES)}")
    return name


def _limits_text() -> str:
    """The time table, for ``--help``."""
    width = max(len(s.name) for s in STAGES)
    lines = [
        "stage time limits (seconds; the most a stage may take, its process start and kill included):",
        f"  {'stage':<{width}}  H100/H200  dry run  in the default run",
    ]
    for s in STAGES:
        lines.append(f"  {s.name:<{width}}  {s.limit_s:>9.0f}  {s.dry_limit_s:>7.0f}  {'yes' if s.default else 'no: --extreme'}")
    lines.append(f"  {'start-up and report':<{width}}  {STARTUP_S:>9.0f}")
    lines.append(f"planned default run: {DEFAULT_PLAN_S:.0f} s; with --extreme: {DEFAULT_PLAN_S + STAGE_LIMITS_S['extreme']:.0f} s.")
    lines.append("A stage that hits its limit is killed there and reported as such, with what it had measured; the checks table is printed last.")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ext = STAGE_LIMITS_S["extreme"]
    p = argparse.ArgumentParser(
        description="CUDA tests, then baseline vs quick/fastest on HLBD, the doctor (needs a CUDA GPU). "
        f"The default run is planned at {DEFAULT_PLAN_S:.0f} s on an H100/H200; the checks table comes last.",
        epilog=_limits_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_results", help="output folder (default: $OUT, else gpu_check_results)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of each row, as many as fit in its limit (default 50; dry run 2)")
    p.add_argument("--baseline-epochs", type=int, default=None, help="epochs of the baseline row, extrapolated to --epochs (default 3; dry run 2)")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds the whole call may take (default: the plan, start-up plus the limits of the stages run: "
        f"{DEFAULT_PLAN_S:.0f} for the default run); stages get less than their limits when it is short",
    )
    p.add_argument(
        "--extreme",
        action="store_true",
        help=f"also run the extreme row (Compile('max-autotune'): minutes of compilation), last. COSTS up to {ext:.0f} s "
        f"more: the call then plans {DEFAULT_PLAN_S + ext:.0f} s of the device tool's 600 s per command and leaves "
        f"no time to rerun in a 15-minute window. Better after a default run has passed: --only extreme "
        f"(baseline, then extreme: {STARTUP_S + STAGE_LIMITS_S['baseline'] + ext:.0f} s planned)",
    )
    p.add_argument("--no-extreme", action="store_true", help="(the default now; kept for old command lines)")
    p.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="NAME[,NAME...]",
        help="run only these stages (see the table below; 'extreme' included), plus the rows a selected row "
        "is compared with; to rerun a stage that failed or hit its limit",
    )
    p.add_argument("--limit", action="append", default=[], metavar="NAME=SECONDS", help="change a stage's time limit")
    p.add_argument("--tests-timeout", type=float, default=None, help="the same as --limit 'cuda tests=SECONDS'")
    p.add_argument("--tests", nargs="*", default=None, help="test paths for pytest -m cuda (default: tests; dry run: tests/test_cuda_paths.py)")
    p.add_argument("--skip-tests", action="store_true", help="do not run the CUDA tests")
    p.add_argument("--cpu-dry-run", action="store_true", help="every stage on the CPU with tiny settings (checks this script; ~30 s)")
    p.add_argument(
        "--fail-stage",
        action="append",
        default=[],
        metavar="NAME",
        help="testing this script only: stage NAME's child fails after its first epoch or check (the CUDA tests: a "
        "stand-in where one test fails); the run goes on and the checks table still comes last",
    )
    p.add_argument(
        "--stall-stage",
        action="append",
        default=[],
        metavar="NAME",
        help="testing this script only: stage NAME's child hangs after its first epoch or check until its limit "
        "kills it; the stage is reported as having hit its limit, with what it measured",
    )
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # child: train one row
    p.add_argument("--row-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--row-seconds", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--doctor-out", default=None, help=argparse.SUPPRESS)  # child: the doctor checks
    p.add_argument("--child-fault", choices=("fail", "stall"), default=None, help=argparse.SUPPRESS)  # child: --fail/--stall-stage
    return p


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Epochs, limits, stages selected, faults and budget: the defaults, the dry run's, or the options'.

    Raises ``ValueError`` on an unknown stage name or a bad ``--limit``.
    """
    dry = args.cpu_dry_run
    limits = {s.name: (s.dry_limit_s if dry else s.limit_s) for s in STAGES}
    if args.tests_timeout:
        limits["cuda tests"] = args.tests_timeout
    for item in args.limit:
        name, sep, value = item.rpartition("=")
        if not sep:
            raise ValueError(f"--limit {item!r}: expected NAME=SECONDS")
        limits[stage_name(name)] = float(value)
    if args.only:
        chosen = {stage_name(n) for item in args.only for n in item.split(",") if n.strip()}
    else:
        chosen = {s.name for s in STAGES if s.default}
    if args.extreme:
        chosen.add("extreme")
    while True:  # the rows a chosen row is compared with
        refs = {ROW_PLANS[n].reference for n in chosen if n in ROW_PLANS and ROW_PLANS[n].reference} - chosen
        if not refs:
            break
        chosen |= refs
    if args.skip_tests:
        chosen.discard("cuda tests")
    selected = [s.name for s in STAGES if s.name in chosen]
    faults = {stage_name(n): "fail" for n in args.fail_stage} | {stage_name(n): "stall" for n in args.stall_stage}
    planned = STARTUP_S + sum(limits[n] for n in selected)
    return {
        "epochs": args.epochs or (DRY_RUN["epochs"] if dry else 50),
        "baseline_epochs": args.baseline_epochs or (DRY_RUN["baseline_epochs"] if dry else 3),
        "tests": args.tests if args.tests else (DRY_RUN["tests"] if dry else ["tests"]),
        "limits_s": limits,
        "selected": selected,
        "faults": faults,
        "planned_s": planned,
        "budget_s": args.budget if args.budget is not None else planned,
    }


class _Stopped(BaseException):
    """The call was told to stop (SIGTERM, Ctrl-C): the stage running is killed, the report still comes."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Stopped(f"the call got signal {signum} (SIGTERM)")


def _why_not_selected(name: str, args: argparse.Namespace) -> str:
    if name == "cuda tests" and args.skip_tests:
        return "skipped (--skip-tests)"
    if name == "extreme" and not args.only:
        return f"not run: opt-in (--extreme, up to {STAGE_LIMITS_S['extreme']:.0f} s more)"
    return "not selected (--only)"


def _record_not_run(result: dict[str, Any], name: str, why: str, deselected: bool, args: argparse.Namespace) -> None:
    """A stage left out on purpose (``deselected``: never a failure) or not run (no time, the call stopped)."""
    if name == "cuda tests":
        result["cuda_tests"] = (None if args.skip_tests else {"deselected": why}) if deselected else {"skipped": why}
    elif name == "doctor":
        result["doctor"] = [{"name": "doctor", "ok": None if deselected else False, "skipped": why, "problem": None if deselected else f"not run: {why}"}]
    else:
        _put(result["rows"], skipped_row(ROW_PLANS[name], why, deselected=deselected))


def _run_stage(name: str, cap: float, result: dict[str, Any], cfg: dict[str, Any], out: Path) -> None:
    dry, fault = bool(result["dry_run"]), cfg["faults"].get(name)
    if name == "cuda tests":
        result["cuda_tests"] = run_cuda_tests(cfg["tests"], cap, out, fault)
    elif name == "doctor":
        result["doctor"] = run_doctor(cap, out, dry, fault)
    else:
        epochs = cfg["baseline_epochs"] if name == "baseline" else cfg["epochs"]
        _put(result["rows"], run_row(ROW_PLANS[name], epochs, cap, out, dry, fault))


def _record_broken(result: dict[str, Any], name: str, cap: float, out: Path, why: str) -> None:
    """A stage cut short by the parent (its own error, or the call stopped): what its child had written, and why."""
    if name == "cuda tests":
        result["cuda_tests"] = collect_tests(out, cap, None, why)
    elif name == "doctor":
        result["doctor"] = collect_doctor(out, cap, None, why)
    else:
        _put(result["rows"], collect_row(ROW_PLANS[name], out, cap, None, why))


def stage_outcome(result: dict[str, Any], name: str) -> str:
    """How a stage ended, in a few words: done, FAILED, HIT ITS LIMIT (with what it measured), not run, not selected."""
    if name == "cuda tests":
        t = result.get("cuda_tests")
        if t is None or t.get("deselected"):
            return (t or {}).get("deselected") or "skipped (--skip-tests)"
        counts = ", ".join(f"{v} {k}" for k, v in (t.get("counts") or {}).items()) or "no test finished"
        if t.get("skipped"):
            return f"not run: {t['skipped']}"
        if t.get("error"):
            return f"FAILED: {t['error']} ({counts})"
        if t.get("timed_out"):
            return f"HIT ITS LIMIT: killed; {counts} before"
        return f"{'done' if t.get('returncode') == 0 else 'FAILED'}: {counts}"
    if name == "doctor":
        checks = result.get("doctor") or []
        done = [c for c in checks if "step_ms" in c]
        skipped = next((c for c in checks if c.get("skipped")), None)
        if skipped:
            return f"not run: {skipped['skipped']}" if skipped.get("ok") is False else skipped["skipped"]
        if any(c.get("timed_out") for c in checks):
            return f"HIT ITS LIMIT: killed; {len(done)} of 3 checks done"
        bad = [c for c in checks if c.get("ok") is False]
        return f"FAILED: {len(bad)} of {len(checks)} checks" if bad else f"done: {len(done)} checks"
    r = next((r for r in result.get("rows") or [] if r.get("name") == name), None)
    if r is None:
        return "not recorded"
    n = f"{r.get('epochs', 0)} epoch{'' if r.get('epochs', 0) == 1 else 's'}"
    if r.get("skipped"):
        return r["skipped"] if r.get("deselected") else f"not run: {r['skipped']}"
    if r.get("timed_out"):
        return f"HIT ITS LIMIT: killed; {n} measured"
    if r.get("error"):
        return f"FAILED after {n}: {str(r['error'])[:100]}"
    return f"done: {n}" + (" (stopped before its limit)" if r.get("stopped") else "")


def run_check(args: argparse.Namespace, clock: Clock) -> int:
    """The stages in :data:`STAGES` order, the JSON after each, the tables last (always); returns the exit status."""
    dry, cfg = args.cpu_dry_run, _settings(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clock.budget_s = cfg["budget_s"]
    result: dict[str, Any] = {
        "dry_run": dry,
        "gpu": None if dry else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "config": cfg,
        "stages": [],
        "stages_done": [],
        "cuda_tests": None,
        "rows": [],
        "doctor": [],
    }

    def save(stage: str) -> None:  # the verdict so far: stages not yet run count as missing
        result["stages_done"].append(stage)
        result["seconds"] = round(clock.elapsed(), 1)
        result["exit_status"], result["problems"] = verdict(result)
        write_json(out / "gpu_check.json", result)

    plan = ", ".join(f"{n} {cfg['limits_s'][n]:.0f}" for n in cfg["selected"])
    _say(f"plan: {plan}, start-up {STARTUP_S:.0f}: {cfg['planned_s']:.0f} s (budget {cfg['budget_s']:.0f} s)")
    stopped: str | None = None
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        try:
            for i, stage in enumerate(STAGES):
                stopped = _one_stage(i, result, cfg, clock, out, args, stopped)
                save(stage.name)
        except (_Stopped, KeyboardInterrupt) as e:  # between two stages: the ones not recorded yet are not run
            stopped = stopped or f"stopped after {clock.elapsed():.0f} s: {e or type(e).__name__}"
            recorded = {s["name"] for s in result["stages"]}
            for stage in STAGES:
                if stage.name not in recorded:
                    deselected = stage.name not in cfg["selected"]
                    why = _why_not_selected(stage.name, args) if deselected else stopped
                    _record_not_run(result, stage.name, why, deselected, args)
                    _put(
                        result["stages"],
                        {"name": stage.name, "limit_s": cfg["limits_s"][stage.name], "seconds": None, "outcome": stage_outcome(result, stage.name)},
                    )
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the report takes milliseconds: let it finish
        try:
            save("report")
            _print_report(result, out)
        finally:
            signal.signal(signal.SIGTERM, previous)
    return int(result["exit_status"])


def _put(items: list[dict[str, Any]], item: dict[str, Any]) -> None:
    """Append ``item``, replacing an earlier one of the same name."""
    items[:] = [x for x in items if x.get("name") != item["name"]] + [item]


def _one_stage(i: int, result: dict[str, Any], cfg: dict[str, Any], clock: Clock, out: Path, args: argparse.Namespace, stopped: str | None) -> str | None:
    """Run (or record as not selected / not run) the ``i``-th stage; returns why the call stopped, if it did."""
    name, limit = STAGES[i].name, cfg["limits_s"][STAGES[i].name]
    if name not in cfg["selected"]:
        _record_not_run(result, name, _why_not_selected(name, args), True, args)
        _put(result["stages"], {"name": name, "limit_s": limit, "seconds": None, "outcome": stage_outcome(result, name)})
        return stopped
    later = [n for n in cfg["selected"] if n in {s.name for s in STAGES[i + 1 :]}]
    cap = clock.allot(limit, sum(min(MIN_STAGE_S, cfg["limits_s"][n]) for n in later))
    t0 = time.perf_counter()
    if stopped is not None:
        _record_not_run(result, name, stopped, False, args)
    elif cap < min(MIN_STAGE_S, limit):
        _record_not_run(result, name, f"time budget spent ({clock.left():.0f} s left)", False, args)
    else:
        _say(f"{name}: at most {cap:.0f} s (limit {limit:.0f} s) ...")
        try:
            _run_stage(name, cap, result, cfg, out)
        except (_Stopped, KeyboardInterrupt) as e:
            stopped = f"stopped after {clock.elapsed():.0f} s: {e or type(e).__name__}"
            _record_broken(result, name, cap, out, stopped)
        except Exception as e:  # noqa: BLE001 - this script's own error: the stage fails, the others still run
            _record_broken(result, name, cap, out, f"gpu_check's own error: {type(e).__name__}: {e}".splitlines()[0][:300])
    _put(
        result["stages"],
        {"name": name, "limit_s": limit, "cap_s": round(cap, 1), "seconds": round(time.perf_counter() - t0, 1), "outcome": stage_outcome(result, name)},
    )
    return stopped


def _say(text: str) -> None:
    print(f"gpu_check: {text}", file=sys.stderr, flush=True)


def stages_table(result: dict[str, Any]) -> list[str]:
    """Each stage: its limit, the seconds it took, and how it ended (HIT ITS LIMIT: killed there, what it measured kept)."""
    out = ["| stage | limit s | took s | outcome |", "|---|---:|---:|---|"]
    for s in result.get("stages") or []:
        out.append(f"| {s['name']} | {s['limit_s']:.0f} | {_f(s.get('seconds'), '.1f')} | {s['outcome']} |")
    return out


def _print_report(result: dict[str, Any], out: Path) -> None:
    """The doctor's reports, the stage times, the speed table, then the checks table last."""
    sys.stderr.flush()
    for c in result.get("doctor") or []:
        if c.get("report"):
            print(c["report"], end="\n\n")
    where = "CPU dry run (tiny model, 64 pairs)" if result["dry_run"] else result["gpu"]
    cfg = result["config"]
    print(
        f"gpu_check on {where}, torch {result['torch']}: {result['seconds']:.0f} s of a {cfg['budget_s']:.0f} s "
        f"budget (planned {cfg['planned_s']:.0f} s); JSON and logs in {out}",
        end="\n\n",
    )
    print("\n".join(stages_table(result)), end="\n\n")
    print("\n".join(speed_table(result)), end="\n\n")
    print("\n".join(checks_table(result, result["exit_status"], result["problems"])), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the check (or, as a child, one row or the doctor checks); returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    dry = args.cpu_dry_run
    if dry:
        torch.set_num_threads(1)  # tiny models on a shared CPU: spinning intra-op threads cost up to 10x
    if args.row is not None:
        epochs = args.epochs or (DRY_RUN["epochs"] if dry else 50)
        return train_row(args.row, epochs, args.row_seconds or 60.0, Path(args.row_out), dry, args.child_fault)
    if args.doctor_out is not None:
        return doctor_checks(Path(args.doctor_out), dry, args.child_fault)
    try:
        _settings(args)
    except ValueError as e:
        parser.error(str(e))
    if not torch.cuda.is_available() and not dry:
        print(
            "gpu_check: error: no CUDA device here (torch.cuda.is_available() is False); run it on a machine with a GPU, "
            "or --cpu-dry-run to check the script itself",
            file=sys.stderr,
        )
        return 2
    return run_check(args, Clock(DEFAULT_PLAN_S, started=_STARTED))


if __name__ == "__main__":
    sys.exit(main())
