"""benchmarks/gpu_check.py: its CPU dry run works end to end, and its verdict cannot pass a failure silently.

The dry run (every stage on the CPU, tiny: about 30 s here) runs once, as a subprocess, as
on a GPU machine; a second, shorter one (about 35 s) runs ``extreme`` (``--extreme``) with
one row failing and one hanging until its limit (``--fail-stage``/``--stall-stage``), to
check that the checks table still comes last; a third is stopped by SIGTERM mid-stage. The
time plan is checked on the script's stage-limit table (:data:`gpu_check.STAGES`): the
default run fits in 300 s. The verdict and the tables are checked directly on collected
results: a CUDAGraphStep fallback, a final loss beyond its tolerance, a failed or timed-out
pytest stage each make the exit status non-zero, and the last table says why.
"""

from __future__ import annotations

import contextlib
import copy
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
from gpu_check import EXTREME, PLANS, STAGES, STARTUP_S, Clock, checks_table, parse_pytest_log, verdict  # noqa: E402

SCRIPT = str(ROOT / "benchmarks" / "gpu_check.py")


# ---------------------------------------------------------------------------- the dry run, end to end
@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, SCRIPT, "--cpu-dry-run", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return proc, out


def test_dry_run_runs_every_stage_and_prints_the_table_last(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.rstrip().splitlines()
    assert lines[-1].startswith("| **overall** | every check passed | exit status 0 | **PASS** |")
    header = max(i for i, line in enumerate(lines) if line.startswith("| check | result |"))
    assert all(line.startswith("|") for line in lines[header:]), "the checks table is the last thing printed"
    table = "\n".join(lines[header:])
    for name in (
        "CUDA tests (pytest -m cuda)",
        "| baseline |",
        "| quick |",
        "| fastest |",
        "| fastest without CUDAGraphStep |",
        "| fastest without buckets |",
        "| extreme |",
        "doctor: fastest",
        "doctor: baseline preset",
    ):
        assert name in table, name
    assert "<= 1.00% vs baseline" in table and "<= 1.00% vs fastest" in table  # each row states its tolerance
    assert "| row | epochs | s/epoch |" in proc.stdout  # the speed table, before the checks


def test_dry_run_writes_the_json_and_logs(dry_run):
    _, out = dry_run
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["dry_run"] is True and result["exit_status"] == 0 and result["problems"] == []
    assert [r["name"] for r in result["rows"]] == [p.name for p in PLANS] + ["extreme"]
    assert result["cuda_tests"]["returncode"] == 0 and result["cuda_tests"]["counts"].get("skipped", 0) >= 1
    assert (out / "cuda_tests.log").exists() and (out / "doctor.log").exists()
    assert [c["ok"] for c in result["doctor"]] == [True, True, True]
    baseline = result["rows"][0]
    assert baseline["epochs"] == 2 and len(baseline["losses"]) == 2 and baseline["plan"]["reference"] is None
    fastest = next(r for r in result["rows"] if r["name"] == "fastest")
    assert fastest["plan"]["tolerance"] == 0.01 and fastest["s_per_epoch"] > 0
    extreme = result["rows"][-1]  # its cap is seconds in the dry run: stopped (or done), never a failure
    assert extreme.get("timed_out") or extreme.get("losses") or extreme.get("skipped")
    for r in result["rows"][:-1]:
        assert (out / f"row_{r['name'].replace(' ', '_').lower()}.json").exists()


def assert_checks_table_last(lines: list[str]) -> str:
    """The checks table is the last block printed (nothing after it), ending with the overall row; returns it."""
    header = max(i for i, line in enumerate(lines) if line.startswith("| check | result |"))
    assert all(line.startswith("|") for line in lines[header:]), "the checks table is the last thing printed"
    assert lines[-1].startswith("| **overall** |")
    return "\n".join(lines[header:])


def test_extreme_is_not_run_by_default(dry_run):
    proc, out = dry_run
    result = json.loads((out / "gpu_check.json").read_text())
    extreme = result["rows"][-1]
    assert extreme["name"] == "extreme" and extreme.get("deselected") and "--extreme" in extreme["skipped"]
    assert not (out / "row_extreme.log").exists() and "wall_s" not in extreme  # no child was started for it
    assert "extreme" not in result["config"]["selected"]
    stage = next(s for s in result["stages"] if s["name"] == "extreme")
    assert stage["seconds"] is None and stage["outcome"].startswith("not run: opt-in")
    assert "row extreme" not in proc.stderr and "extreme: at most" not in proc.stderr
    # every default stage reports its limit and the seconds it took, in the stage table printed before the checks
    assert [s["name"] for s in result["stages"]] == [s.name for s in STAGES]
    assert "| stage | limit s | took s | outcome |" in proc.stdout


# ---------------------------------------------------------------------------- the time plan (the stage-limit table)
def test_the_default_run_is_planned_within_300_s():
    default = [s for s in STAGES if s.default]
    assert [s.name for s in default] == ["cuda tests", *(p.name for p in PLANS), "doctor"]  # every stage has a limit
    assert all(s.limit_s > 0 and s.dry_limit_s > 0 for s in STAGES)
    planned = STARTUP_S + sum(s.limit_s for s in default)
    assert planned <= 300.0, planned
    assert gpu_check.DEFAULT_PLAN_S == planned and gpu_check.STAGE_LIMITS_S == {s.name: s.limit_s for s in STAGES}
    extreme = next(s for s in STAGES if s.name == "extreme")
    assert not extreme.default  # opt-in: its minutes of compilation are not in the plan
    assert planned + extreme.limit_s <= 570.0  # --extreme still fits one 600 s device command


def test_help_states_the_plan_and_what_extreme_costs(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    ext = gpu_check.STAGE_LIMITS_S["extreme"]
    assert f"planned default run: {gpu_check.DEFAULT_PLAN_S:.0f} s" in text
    assert "--extreme also run the extreme row" in text and f"COSTS up to {ext:.0f} s more" in text
    assert "--only" in text and "--fail-stage" in text and "--stall-stage" in text


def test_a_bad_stage_name_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--cpu-dry-run", "--only", "fastets"])
    assert e.value.code == 2 and "no stage 'fastets'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- extreme on request; failures and limits
@pytest.fixture(scope="module")
def fault_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """``--extreme``, with quick failing after its first epoch and baseline hanging after its first until its limit."""
    out = tmp_path_factory.mktemp("gpu_check_faults")
    cmd = [
        sys.executable,
        SCRIPT,
        "--cpu-dry-run",
        "--out",
        str(out),
        "--skip-tests",
        "--only",
        "quick",
        "--extreme",
        "--fail-stage",
        "quick",
        "--stall-stage",
        "baseline",
        "--limit",
        "baseline=20",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    return proc, out  # stdout and stderr in one stream, as the device tool returns them


def test_extreme_runs_with_the_flag(fault_run):
    proc, out = fault_run
    result = json.loads((out / "gpu_check.json").read_text())
    extreme = next(r for r in result["rows"] if r["name"] == "extreme")
    assert not extreme.get("skipped") and extreme["wall_s"] is not None and (out / "row_extreme.log").exists()
    assert extreme.get("timed_out") or extreme.get("losses")  # max-autotune on the CPU: cut at its dry-run limit, or done
    assert "extreme" in result["config"]["selected"] and "extreme: at most" in proc.stdout
    assert "| extreme |" in assert_checks_table_last(proc.stdout.rstrip().splitlines())


def test_the_table_is_last_when_a_stage_fails_or_hits_its_limit(fault_run):
    proc, out = fault_run
    assert proc.returncode == 1, proc.stdout[-3000:]
    lines = proc.stdout.rstrip().splitlines()
    table = assert_checks_table_last(lines)
    assert "**FAIL: 2 problems**" in lines[-1]
    assert "quick: failed: RuntimeError: failed on purpose after the first epoch (--fail-stage)" in lines[-1]
    assert "baseline: timed out (hit its 20 s limit" in lines[-1]
    assert "| doctor | not selected (--only) | - | SKIP |" in table and "| CUDA tests | skipped (--skip-tests) |" in table
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["exit_status"] == 1 and result["config"]["selected"] == ["baseline", "quick", "extreme"]
    baseline = next(r for r in result["rows"] if r["name"] == "baseline")  # killed at its limit, what it measured kept
    assert baseline["timed_out"].startswith("hit its 20 s limit") and baseline["epochs"] >= 1 and baseline["losses"]
    assert baseline["wall_s"] < 20 + 5
    quick = next(r for r in result["rows"] if r["name"] == "quick")
    assert quick["error"] and quick["epochs"] == 1 and len(quick["losses"]) == 1
    stages = {s["name"]: s for s in result["stages"]}
    assert stages["baseline"]["outcome"] == "HIT ITS LIMIT: killed; 1 epoch measured"
    assert stages["quick"]["outcome"].startswith("FAILED after 1 epoch")
    assert all(not r.get("deselected") for r in result["rows"] if r["name"] in ("baseline", "quick", "extreme"))
    assert [r["name"] for r in result["rows"] if r.get("deselected")] == [p.name for p in PLANS[2:]]


def _children_of_run(out: Path) -> list[int]:
    """Processes whose command line names ``out`` (the run's children write there)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if str(out) in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
    return pids


def test_sigterm_mid_stage_kills_the_stage_and_still_prints_the_table_last(tmp_path):
    if not Path("/proc/self/cmdline").exists():
        pytest.skip("needs /proc")
    cmd = [sys.executable, SCRIPT, "--cpu-dry-run", "--out", str(tmp_path), "--skip-tests", "--only", "baseline,doctor", "--stall-stage", "baseline"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "row_baseline.log"
    deadline = time.monotonic() + 120
    while not (log.exists() and "stalling on purpose" in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "the stalled row never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    lines = output.rstrip().splitlines()
    assert_checks_table_last(lines)
    assert "baseline: failed: stopped after" in lines[-1] and "SIGTERM" in lines[-1]
    assert "doctor: not run: stopped after" in lines[-1]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["rows"][0]["epochs"] == 1  # what the stopped row had measured is kept
    assert not _children_of_run(tmp_path), "the stalled row's process outlived the call"


# ---------------------------------------------------------------------------- the verdict on collected results
def passing_result(dry: bool = False) -> dict[str, Any]:
    """What a good run on a GPU collects (figures made up, shapes as gpu_check writes them)."""
    losses = {
        "baseline": [8.4, 7.2, 6.55],
        "quick": [8.4, 7.2, 6.56] + [6.0] * 47,
        "fastest": [8.4, 7.2, 6.548] + [5.9] * 47,
        "fastest without CUDAGraphStep": [8.4, 7.2, 6.548] + [5.9] * 47,
        "fastest without buckets": [8.4, 7.2, 6.55] + [5.9] * 47,
    }
    rows = []
    for plan in PLANS:
        info = {"cuda_graphs": 5, "capture_seconds": 1.0} if plan.graphs else {}
        rows.append(
            {
                "name": plan.name,
                "plan": vars(plan).copy(),
                "error": None,
                "losses": losses[plan.name],
                "epochs": len(losses[plan.name]),
                "info": info,
                "s_per_epoch": 0.1,
                "one_off_s": None,
            }
        )
    rows.append(gpu_check.skipped_row(EXTREME, "skipped: 80 s left, max-autotune compilation needs about 120 s or more"))
    return {
        "dry_run": dry,
        "gpu": "NVIDIA H200",
        "torch": "2.x",
        "config": {"epochs": 50, "budget_s": 540},
        "cuda_tests": {
            "returncode": 0,
            "timed_out": False,
            "seconds": 95.0,
            "timeout_s": 200,
            "counts": {"passed": 40, "skipped": 2},
            "failed_tests": [],
            "summary": "40 passed, 2 skipped in 95.0s",
        },
        "rows": rows,
        "doctor": [
            {"name": "doctor: fastest", "ok": True, "step_ms": 3.0, "run_info": {"cuda_graphs": 4}},
            {"name": "doctor: baseline preset", "ok": True, "step_ms": 40.0, "syncs_per_step": 8.0},
        ],
    }


def row(result: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in result["rows"] if r["name"] == name)


def last_table(result: dict[str, Any]) -> str:
    status, problems = verdict(result)
    return "\n".join(checks_table(result, status, problems))


def test_a_good_run_passes():
    result = passing_result()
    assert verdict(result) == (0, [])
    table = last_table(result)
    assert table.splitlines()[-1] == "| **overall** | every check passed | exit status 0 | **PASS** |"
    assert "| extreme | skipped: 80 s left" in table and table.count("| SKIP |") == 1


def test_a_cuda_graph_fallback_fails_and_the_table_says_why():
    result = passing_result()
    row(result, "fastest")["info"]["cuda_graph_fallback"] = "capturing the step failed (RuntimeError: operation not permitted)"
    status, problems = verdict(result)
    assert status == 1
    assert problems == ["fastest: CUDAGraphStep fell back to the eager step: capturing the step failed (RuntimeError: operation not permitted)"]
    table = last_table(result)
    assert "**FAIL: 1 problem**" in table.splitlines()[-1] and "fell back" in table.splitlines()[-1]
    assert next(line for line in table.splitlines() if line.startswith("| fastest |")).endswith("| FAIL |")


def test_a_fallback_under_the_doctor_or_no_graph_at_all_fails():
    result = passing_result()
    row(result, "fastest without buckets")["info"] = {}  # trained, but nothing was captured
    result["doctor"][0].update(ok=False, problem="CUDAGraphStep fell back under the doctor: capturing the step failed")
    status, problems = verdict(result)
    assert status == 1
    assert "fastest without buckets: captured no CUDA graph" in problems
    assert any(p.startswith("doctor: fastest: CUDAGraphStep fell back under the doctor") for p in problems)
    assert verdict(dict(result, dry_run=True))[1] == problems[1:]  # on the CPU nothing is captured: no graph is expected


def test_a_loss_beyond_its_tolerance_fails():
    result = passing_result()
    row(result, "fastest")["losses"][2] = 6.65  # 1.5% off at the baseline's last epoch; tolerance 1%
    status, problems = verdict(result)
    assert status == 1
    assert problems == ["fastest: final loss 6.6500 at epoch 3 is 1.53% from baseline's 6.5500 (tolerance 1.00%)"]
    # the graph's own check: the eager twin must stay within 1% of fastest at the same epoch count
    result = passing_result()
    row(result, "fastest without CUDAGraphStep")["losses"][-1] = 6.018
    assert verdict(result)[1] == ["fastest without CUDAGraphStep: final loss 6.0180 at epoch 50 is 2.00% from fastest's 5.9000 (tolerance 1.00%)"]
    assert "<= 1.00% vs fastest" in last_table(result)


def test_a_missing_or_failed_row_fails():
    result = passing_result()
    row(result, "baseline").update(error="RuntimeError: CUDA out of memory", losses=[], epochs=0)
    status, problems = verdict(result)
    assert status == 1 and "baseline: failed: RuntimeError: CUDA out of memory" in problems
    assert any("no final loss to compare (baseline has none)" in p for p in problems)
    result = passing_result()
    result["rows"][1] = gpu_check.skipped_row(PLANS[1], "time budget spent (10 s left)")
    assert verdict(result)[1] == ["quick: not run (time budget spent (10 s left))"]
    result = passing_result()
    row(result, "quick")["timed_out"] = "killed after 105 s (cap 75 s + 30 s)"
    assert verdict(result)[1] == ["quick: timed out (killed after 105 s (cap 75 s + 30 s))"]


def test_the_optional_extreme_row_may_be_skipped_or_cut_but_not_fail():
    result = passing_result()
    result["rows"][-1] = {
        "name": "extreme",
        "plan": vars(EXTREME).copy(),
        "error": None,
        "losses": [],
        "epochs": 0,
        "timed_out": "killed after 200 s (cap 170 s + 30 s)",
    }
    assert verdict(result) == (0, [])
    assert "| extreme | 0 epochs; timed out: killed after 200 s" in last_table(result)
    result["rows"][-1].update(error="BackendCompilerFailed: inductor raised", timed_out=None)
    assert verdict(result)[1] == ["extreme: failed: BackendCompilerFailed: inductor raised"]


def test_stages_left_out_on_purpose_are_not_failures():
    result = passing_result()  # as --only fastest writes it: the other stages not selected
    for i, plan in enumerate(PLANS):
        if plan.name not in ("baseline", "fastest"):
            result["rows"][i] = gpu_check.skipped_row(plan, "not selected (--only)", deselected=True)
    result["cuda_tests"] = {"deselected": "not selected (--only)"}
    result["doctor"] = [{"name": "doctor", "ok": None, "skipped": "not selected (--only)"}]
    assert verdict(result) == (0, [])
    table = last_table(result)
    assert "| CUDA tests | not selected (--only) | - | SKIP |" in table and "| doctor | not selected (--only) | - | SKIP |" in table
    assert next(line for line in table.splitlines() if line.startswith("| quick |")).endswith("| SKIP |")
    result["doctor"] = [
        {"name": "doctor", "ok": False, "skipped": "time budget spent (3 s left)", "problem": "not run: time budget spent (3 s left)"}
    ]  # selected, but left without time: a failure
    assert verdict(result)[1] == ["doctor: not run: time budget spent (3 s left)"]
    assert "| doctor | not run: time budget spent (3 s left) | - | FAIL |" in last_table(result)


@pytest.mark.parametrize(
    "tests, words",
    [
        (
            {
                "returncode": 1,
                "timed_out": False,
                "seconds": 80.0,
                "counts": {"passed": 38, "failed": 2},
                "failed_tests": ["tests/test_cuda_paths.py::test_nccl_world_of_one[tcp]"],
                "summary": "2 failed, 38 passed in 80s",
            },
            "CUDA tests: 2 failed or errored (tests/test_cuda_paths.py::test_nccl_world_of_one[tcp])",
        ),
        (
            {
                "returncode": None,
                "timed_out": True,
                "seconds": 200.0,
                "counts": {"passed": 12},
                "running_when_stopped": "tests/test_compile.py::test_cuda_inductor_within_1e_5_of_eager",
                "summary": "",
            },
            "CUDA tests timed out after 200.0 s while running tests/test_compile.py::test_cuda_inductor_within_1e_5_of_eager",
        ),
        ({"returncode": 0, "timed_out": False, "seconds": 3.0, "counts": {"skipped": 40}, "summary": "40 skipped in 3s"}, "CUDA tests: none passed"),
        (
            {"returncode": 2, "timed_out": False, "seconds": 3.0, "counts": {"error": 1}, "failed_tests": [], "summary": "1 error in 3s"},
            "CUDA tests: 1 failed or errored (1 error in 3s)",
        ),
        ({"skipped": "time budget spent"}, "CUDA tests not run: time budget spent"),
    ],
)
def test_a_failed_or_timed_out_pytest_stage_fails(tests, words):
    result = passing_result()
    result["cuda_tests"] = dict(tests, timeout_s=200)
    status, problems = verdict(result)
    assert status == 1 and problems[0].startswith(words), problems
    table = last_table(result)
    assert next(line for line in table.splitlines() if line.startswith("| CUDA tests")).endswith("| FAIL |")
    assert words in table.splitlines()[-1]


def test_tests_skipped_on_purpose_are_not_a_failure_but_a_dry_run_needs_no_pass():
    result = passing_result()
    result["cuda_tests"] = None  # --skip-tests
    assert verdict(result) == (0, []) and "| CUDA tests | skipped (--skip-tests) | - | SKIP |" in last_table(result)
    result = passing_result(dry=True)
    result["cuda_tests"].update(counts={"skipped": 10}, summary="10 skipped in 0.1s")
    assert verdict(result) == (0, [])


# ---------------------------------------------------------------------------- pieces
def test_pytest_log_cut_short_keeps_the_finished_tests_and_names_the_running_one():
    lines = [
        "============================= test session starts ==============================",
        "tests/test_a.py::test_one PASSED                                         [ 25%]",
        "tests/test_a.py::test_two[x] FAILED                                      [ 50%]",
        "tests/test_b.py::test_three SKIPPED (needs a CUDA device)                [ 75%]",
        "tests/test_b.py::test_hangs ",
    ]
    parsed = parse_pytest_log(lines)
    assert parsed["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert parsed["failed_tests"] == ["tests/test_a.py::test_two[x]"]
    assert parsed["running_when_stopped"] == "tests/test_b.py::test_hangs"
    done = parse_pytest_log(
        lines[:3]
        + [
            "=============================== warnings summary ===============================",
            "tests/test_a.py::test_two[x]",
            "  src/x.py:3: UserWarning: careful",
            "=================== 1 failed, 1 passed, 2 errors in 3.10s ===================",
        ]
    )
    assert done["counts"] == {"failed": 1, "passed": 1, "error": 2} and done["running_when_stopped"] is None


def test_a_child_past_its_time_is_killed_with_its_own_children(tmp_path):
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('started', flush=True); time.sleep(60)"
    t0 = time.perf_counter()
    run = gpu_check.run_child([sys.executable, "-c", code], 2.0, tmp_path / "child.log")
    assert run["timed_out"] and run["returncode"] is None and time.perf_counter() - t0 < 20
    assert (tmp_path / "child.log").read_text().strip() == "started"  # what it printed before the kill is kept


def test_a_fallback_is_read_from_typed_reports_and_from_a_flat_info():
    # trainer.reports() (or the doctor's run_info) by strategy, and the flat history.info of older trainers
    typed = {
        "CUDAGraphStep": {"graphing": False, "graphs": 0, "capture_seconds": 0.0, "fallback": "capture failed"},
        "Compile": {"compile_seconds": 12.5, "graph_breaks": [{"reason": "x"}], "recompiles": [], "input_shapes": 2, "compile_fallback": None},
    }
    assert gpu_check.flat_info(typed) == {
        "cuda_graphs": 0,
        "capture_seconds": 0.0,
        "cuda_graph_fallback": "capture failed",
        "compile_seconds": 12.5,
        "graph_breaks": 1,
        "recompiles": 0,
    }
    assert gpu_check.flat_info({"cuda_graphs": 4, "capture_seconds": 1.0}) == {"cuda_graphs": 4, "capture_seconds": 1.0}
    result = passing_result()
    row(result, "fastest")["info"] = gpu_check.flat_info(typed)
    assert "fastest: CUDAGraphStep fell back to the eager step: capture failed" in verdict(result)[1]


def test_clock_leaves_time_for_the_stages_after():
    clock = Clock(540.0, started=time.perf_counter() - 500.0)
    assert 39.0 < clock.left() <= 40.0
    assert clock.allot(200.0) == pytest.approx(clock.left(), abs=0.1)
    assert clock.allot(200.0, reserve_s=30.0) < 10.5
    assert Clock(540.0).allot(200.0, reserve_s=135.0) == 200.0


def test_the_plans_state_a_tolerance_for_every_compared_row():
    for plan in (*PLANS, EXTREME):
        assert (plan.reference is None) == (plan.tolerance is None), plan.name
        assert plan.why, plan.name
    assert copy.deepcopy(PLANS)[0].name == "baseline"
