"""benchmarks/gpu_check.py: its CPU dry run works end to end, and its verdict cannot pass a failure silently.

The dry run (every stage on the CPU, tiny: about 45 s here) runs once, as a subprocess, as
on a GPU machine. The verdict and the tables are checked directly on collected results: a
CUDAGraphStep fallback, a final loss beyond its tolerance, a failed or timed-out pytest
stage each make the exit status non-zero, and the last table says why.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
from gpu_check import EXTREME, PLANS, Clock, checks_table, parse_pytest_log, verdict  # noqa: E402


# ---------------------------------------------------------------------------- the dry run, end to end
@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-dry-run", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    return proc, out


def test_dry_run_runs_every_stage_and_prints_the_table_last(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.rstrip().splitlines()
    assert lines[-1].startswith("| **overall** | every check passed | exit status 0 | **PASS** |")
    header = max(i for i, line in enumerate(lines) if line.startswith("| check | result |"))
    assert all(line.startswith("|") for line in lines[header:]), "the checks table is the last thing printed"
    table = "\n".join(lines[header:])
    for name in ("CUDA tests (pytest -m cuda)", "| baseline |", "| quick |", "| fastest |", "| fastest without CUDAGraphStep |",
                 "| fastest without buckets |", "| extreme |", "doctor: fastest", "doctor: baseline preset"):
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


# ---------------------------------------------------------------------------- the verdict on collected results
def passing_result(dry: bool = False) -> dict[str, Any]:
    """What a good run on a GPU collects (figures made up, shapes as gpu_check writes them)."""
    losses = {"baseline": [8.4, 7.2, 6.55], "quick": [8.4, 7.2, 6.56] + [6.0] * 47, "fastest": [8.4, 7.2, 6.548] + [5.9] * 47,
              "fastest without CUDAGraphStep": [8.4, 7.2, 6.548] + [5.9] * 47,
              "fastest without buckets": [8.4, 7.2, 6.55] + [5.9] * 47}
    rows = []
    for plan in PLANS:
        info = {"cuda_graphs": 5, "capture_seconds": 1.0} if plan.graphs else {}
        rows.append({"name": plan.name, "plan": vars(plan).copy(), "error": None, "losses": losses[plan.name],
                     "epochs": len(losses[plan.name]), "info": info, "s_per_epoch": 0.1, "one_off_s": None})
    rows.append(gpu_check.skipped_row(EXTREME, "skipped: 80 s left, max-autotune compilation needs about 120 s or more"))
    return {
        "dry_run": dry, "gpu": "NVIDIA H200", "torch": "2.x", "config": {"epochs": 50, "budget_s": 540},
        "cuda_tests": {"returncode": 0, "timed_out": False, "seconds": 95.0, "timeout_s": 200,
                       "counts": {"passed": 40, "skipped": 2}, "failed_tests": [], "summary": "40 passed, 2 skipped in 95.0s"},
        "rows": rows,
        "doctor": [{"name": "doctor: fastest", "ok": True, "step_ms": 3.0, "run_info": {"cuda_graphs": 4}},
                   {"name": "doctor: baseline preset", "ok": True, "step_ms": 40.0, "syncs_per_step": 8.0}],
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
    assert problems == ["fastest: CUDAGraphStep fell back to the eager step: capturing the step failed "
                        "(RuntimeError: operation not permitted)"]
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
    assert verdict(result)[1] == ["fastest without CUDAGraphStep: final loss 6.0180 at epoch 50 is 2.00% from fastest's "
                                  "5.9000 (tolerance 1.00%)"]
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
    result["rows"][-1] = {"name": "extreme", "plan": vars(EXTREME).copy(), "error": None, "losses": [], "epochs": 0,
                          "timed_out": "killed after 200 s (cap 170 s + 30 s)"}
    assert verdict(result) == (0, [])
    assert "| extreme | 0 epochs; timed out: killed after 200 s" in last_table(result)
    result["rows"][-1].update(error="BackendCompilerFailed: inductor raised", timed_out=None)
    assert verdict(result)[1] == ["extreme: failed: BackendCompilerFailed: inductor raised"]


@pytest.mark.parametrize("tests, words", [
    ({"returncode": 1, "timed_out": False, "seconds": 80.0, "counts": {"passed": 38, "failed": 2},
      "failed_tests": ["tests/test_cuda_paths.py::test_nccl_world_of_one[tcp]"], "summary": "2 failed, 38 passed in 80s"},
     "CUDA tests: 2 failed or errored (tests/test_cuda_paths.py::test_nccl_world_of_one[tcp])"),
    ({"returncode": None, "timed_out": True, "seconds": 200.0, "counts": {"passed": 12},
      "running_when_stopped": "tests/test_compile.py::test_cuda_inductor_within_1e_5_of_eager", "summary": ""},
     "CUDA tests timed out after 200.0 s while running tests/test_compile.py::test_cuda_inductor_within_1e_5_of_eager"),
    ({"returncode": 0, "timed_out": False, "seconds": 3.0, "counts": {"skipped": 40}, "summary": "40 skipped in 3s"},
     "CUDA tests: none passed"),
    ({"returncode": 2, "timed_out": False, "seconds": 3.0, "counts": {"error": 1}, "failed_tests": [],
      "summary": "1 error in 3s"}, "CUDA tests: 1 failed or errored (1 error in 3s)"),
    ({"skipped": "time budget spent"}, "CUDA tests not run: time budget spent"),
])
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
    lines = ["============================= test session starts ==============================",
             "tests/test_a.py::test_one PASSED                                         [ 25%]",
             "tests/test_a.py::test_two[x] FAILED                                      [ 50%]",
             "tests/test_b.py::test_three SKIPPED (needs a CUDA device)                [ 75%]",
             "tests/test_b.py::test_hangs "]
    parsed = parse_pytest_log(lines)
    assert parsed["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert parsed["failed_tests"] == ["tests/test_a.py::test_two[x]"]
    assert parsed["running_when_stopped"] == "tests/test_b.py::test_hangs"
    done = parse_pytest_log(lines[:3] + ["=============================== warnings summary ===============================",
                                         "tests/test_a.py::test_two[x]", "  src/x.py:3: UserWarning: careful",
                                         "=================== 1 failed, 1 passed, 2 errors in 3.10s ==================="])
    assert done["counts"] == {"failed": 1, "passed": 1, "error": 2} and done["running_when_stopped"] is None


def test_a_child_past_its_time_is_killed_with_its_own_children(tmp_path):
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('started', flush=True); time.sleep(60)"
    t0 = time.perf_counter()
    run = gpu_check.run_child([sys.executable, "-c", code], 2.0, tmp_path / "child.log")
    assert run["timed_out"] and run["returncode"] is None and time.perf_counter() - t0 < 20
    assert (tmp_path / "child.log").read_text().strip() == "started"  # what it printed before the kill is kept


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
