"""One run for a machine with a CUDA GPU: the CUDA tests, then the presets against the original HLBD loop.

    python benchmarks/gpu_check.py [--out DIR]     # DIR defaults to $OUT, else gpu_check_results

1. ``pytest -m cuda -q tests`` (the CUDA-only tests), time-limited;
2. on the bundled HLBD data with the reference model, every row from the same initial
   weights and sample order: ``baseline`` (the original HLBD loop, timed on a few epochs: its
   seconds per epoch are measured and its 50-epoch time extrapolated), ``quick``,
   ``extreme``, ``fastest``, and ``fastest`` with and without length buckets;
3. ``hlbd_fast.doctor`` on the reference model under the baseline preset (it must
   find the loop's 8 loss read-backs per step) and under DeferredLossSync.

4. ``extreme`` (its max-autotune compilation can take minutes) in a child process that
   is stopped when the time budget runs out.

Writes ``gpu_check.json`` (after every stage) and ``bench.json`` to the output folder
and prints the table last. Sized to finish in about 5 minutes on one H100: stages and
rows that would start late are skipped and reported as such (``--budget``). Refuses to
run without CUDA.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing the package
DEFAULT_BUCKETS = (16, 24, 32, 48, 64)


def _run_cuda_tests(timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", str(ROOT / "tests")]
    t0 = time.perf_counter()
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        out = proc.stdout + proc.stderr
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        out += f"\n[gpu_check] pytest stopped after {timeout:.0f} s"
        rc = None
    lines = [line for line in out.strip().splitlines() if line.strip()]
    summary = next((line for line in reversed(lines) if " passed" in line or " failed" in line or " error" in line or "no tests ran" in line), lines[-1] if lines else "")
    return {"command": " ".join(cmd), "returncode": rc, "seconds": round(time.perf_counter() - t0, 1), "summary": summary, "tail": lines[-40:]}


def _bucket_rows(device: torch.device) -> dict[str, Any]:
    """``fastest`` as it is, and the same with the other bucket setting of its TrimPadding."""
    from hlbd_fast.bench import RowSpec
    from hlbd_fast.presets import Preset, get_preset
    from hlbd_fast.strategies.padding import TrimPadding

    def variant(buckets: bool) -> Any:
        def build(dev: torch.device) -> RowSpec:
            p = get_preset("fastest", device=dev)
            trims = [s for s in p.strategies if isinstance(s, TrimPadding)]
            old = trims[0] if trims else TrimPadding()
            new = TrimPadding(multiple_of=old.multiple_of, buckets=(old.buckets or DEFAULT_BUCKETS) if buckets else None, check=old.check)
            strategies = tuple(new if s is old else s for s in p.strategies) if trims else (*p.strategies, new)
            preset = Preset(name=p.name, strategies=strategies, batch_size=p.batch_size, loss_normalization=p.loss_normalization, lr=p.lr)
            return RowSpec(preset, f"TrimPadding(buckets={new.buckets})")

        return build

    has_buckets = True
    try:
        from hlbd_fast.presets import get_preset as gp

        trims = [s for s in gp("fastest", device=device).strategies if isinstance(s, TrimPadding)]
        has_buckets = bool(trims and trims[0].buckets)
    except Exception:  # noqa: BLE001 - the row itself will report the failure
        pass
    if has_buckets:
        return {"fastest, no buckets": variant(False)}
    return {"fastest + buckets": variant(True)}


def _doctor_checks(device: torch.device, tiny: bool = False) -> list[dict[str, Any]]:
    from hlbd_fast.bench import _tiny_model, reference_data
    from hlbd_fast.doctor import diagnose
    from hlbd_fast.models import Seq2SeqTransformer
    from hlbd_fast.strategies.sync import DeferredLossSync

    data, vocab = reference_data(64 if tiny else None)
    torch.manual_seed(0)
    model = _tiny_model() if tiny else Seq2SeqTransformer(vocab_size=vocab)
    checks = []
    for name, kwargs, expect in (
        ("doctor: baseline preset", {"preset": "baseline"}, 8.0),
        ("doctor: batch 32 + DeferredLossSync", {"strategies": [DeferredLossSync()], "batch_size": 32}, None),
    ):
        t0 = time.perf_counter()
        try:
            d = diagnose(model, data, steps=5, warmup=2, device=device, **kwargs)
            ok = None if expect is None else (d.syncs_per_step is not None and d.syncs_per_step >= expect)
            checks.append({
                "name": name, "ok": ok, "expected_min_syncs": expect, "syncs_per_step": d.syncs_per_step,
                "step_ms": d.step_s * 1e3, "device_ms": None if d.device_s is None else d.device_s * 1e3,
                "sync_sources": [list(s) for s in d.sync_sources], "report": str(d), "error": None,
                "seconds": round(time.perf_counter() - t0, 1),
            })
        except Exception as e:  # noqa: BLE001 - reported, the other checks still run
            checks.append({"name": name, "ok": False, "error": f"{type(e).__name__}: {e}", "seconds": round(time.perf_counter() - t0, 1)})
    return checks


def _row_in_subprocess(name: str, epochs: int, timeout: float, out: Path, dry: bool) -> dict[str, Any]:
    """One bench row in a child process, stopped after ``timeout`` seconds (compiling can take long)."""
    folder = out / f"row_{name}"
    code = (
        "import sys; sys.path.insert(0, {src!r})\n"
        "from hlbd_fast.bench import run_bench, _tiny_model, reference_data\n"
        "run_bench(rows=[{name!r}], epochs={epochs}, device={device!r}, out={folder!r}"
        + (", model_factory=_tiny_model, data=reference_data(64)[0]" if dry else "")
        + ")\n"
    ).format(src=str(ROOT / "src"), name=name, epochs=epochs, device="cpu" if dry else "cuda", folder=str(folder))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"name": name, "epochs": epochs, "error": f"timed out: stopped after {timeout:.0f} s (the check's time budget)",
                "wall_s": time.perf_counter() - t0}
    try:
        with open(folder / "bench.json", encoding="utf-8") as f:
            row = json.load(f)["rows"][0]
    except (OSError, ValueError, KeyError, IndexError):
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
        return {"name": name, "epochs": epochs, "error": f"the row's process failed (exit {proc.returncode}): {tail[0]}",
                "wall_s": time.perf_counter() - t0}
    row["wall_s"] = time.perf_counter() - t0
    return row


def main(argv: list[str] | None = None) -> int:
    """Run the checks; returns 0 when everything ran and the checks passed."""
    p = argparse.ArgumentParser(description="CUDA tests, then baseline vs quick/extreme/fastest on HLBD (needs a CUDA GPU).")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_results", help="output folder (default: $OUT, else gpu_check_results)")
    p.add_argument("--epochs", type=int, default=50, help="epochs of each preset row (default 50)")
    p.add_argument("--baseline-epochs", type=int, default=3, help="epochs of the baseline row: s/epoch measured, 50 epochs extrapolated (default 3)")
    p.add_argument("--budget", type=float, default=270.0, help="seconds the whole check may take, about (default 270): later rows are skipped, 'extreme' is stopped")
    p.add_argument("--tests-timeout", type=float, default=100.0, help="seconds allowed for the CUDA tests (default 100)")
    p.add_argument("--skip-tests", action="store_true", help="do not run the CUDA tests")
    p.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)  # the script's own logic on CPU, tiny
    args = p.parse_args(argv)
    dry = args.cpu_dry_run
    if not torch.cuda.is_available() and not dry:
        print("gpu_check: error: no CUDA device here (torch.cuda.is_available() is False); run it on a machine with a GPU", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if dry else "cuda")
    result: dict[str, Any] = {"gpu": None if dry else torch.cuda.get_device_name(device), "torch": torch.__version__}

    def save() -> None:  # after every stage, so a stopped run still leaves its results
        result["seconds"] = round(time.perf_counter() - started, 1)
        with open(out / "gpu_check.json", "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, ensure_ascii=False, default=str)

    def left() -> float:
        return args.budget - (time.perf_counter() - started)

    # 1. the CUDA tests
    if args.skip_tests:
        result["cuda_tests"] = None
    else:
        print("gpu_check: running the CUDA tests ...", file=sys.stderr, flush=True)
        result["cuda_tests"] = _run_cuda_tests(min(args.tests_timeout, max(left() - 120, 30)))
        print(f"gpu_check: CUDA tests: {result['cuda_tests']['summary']}", file=sys.stderr, flush=True)
    save()

    # 2. baseline, fastest (with and without buckets), quick: in this process
    from hlbd_fast.bench import ROWS, _tiny_model, compare_rows, format_table, reference_data, run_bench

    table = dict(ROWS)
    table.update(_bucket_rows(device))
    rows = ["baseline", "fastest", *[k for k in table if k.startswith("fastest") and k != "fastest"], "quick"]
    report = run_bench(
        rows=rows,
        epochs=args.epochs,
        device=device,
        out=out,
        row_epochs={"baseline": args.baseline_epochs},
        time_budget_s=max(left() - 60, 0.0),
        row_table=table,
        model_factory=_tiny_model if dry else None,
        data=reference_data(64)[0] if dry else None,
    )
    result["bench"] = report
    save()

    # 3. the doctor on CUDA: it must count the baseline loop's loss read-backs
    if left() > 45:
        print("gpu_check: doctor on the reference model ...", file=sys.stderr, flush=True)
        result["doctor"] = _doctor_checks(device, tiny=dry)
    else:
        result["doctor"] = [{"name": "doctor", "ok": None, "error": "skipped: time budget spent"}]
    save()

    # 4. extreme (max-autotune compilation can take minutes): in a child process, stopped in time
    if left() > 20:
        print(f"gpu_check: extreme, at most {left():.0f} s ...", file=sys.stderr, flush=True)
        extreme = _row_in_subprocess("extreme", args.epochs, left(), out, dry)
    else:
        extreme = {"name": "extreme", "epochs": args.epochs, "error": "skipped: the time budget was spent"}
    report["rows"].append(extreme)
    compare_rows(report["rows"])
    for r in report["rows"]:
        if r.get("s_per_epoch"):
            r["extrapolated_total_s"] = r["s_per_epoch"] * args.epochs + (r.get("compile_s") or 0.0)
    with open(out / "bench.json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False, default=str)
    save()

    print()
    for d in result["doctor"]:
        if d.get("report"):
            print(d["report"])
            print()
    tests = result["cuda_tests"]
    print("CUDA tests: skipped" if tests is None else f"CUDA tests: {tests['summary']} ({tests['seconds']} s)")
    for d in result["doctor"]:
        status = {True: "PASS", False: "FAIL", None: "info"}[d.get("ok")]
        step = "n/a" if d.get("step_ms") is None else f"{d['step_ms']:.1f} ms"
        busy = "n/a" if d.get("device_ms") is None else f"{d['device_ms']:.1f} ms"
        print(f"{d['name']}: {status}; syncs/step {d.get('syncs_per_step')}; step {step}; device busy {busy}"
              + (f"; error {d['error']}" if d.get("error") else ""))
    print(f"total {result['seconds']:.0f} s; JSON in {out}")
    print()
    print(format_table(report))
    print()
    print(f"| row | {args.epochs}-epoch total s (s/epoch x {args.epochs} + one-off) |")
    print("|---|---:|")
    for r in report["rows"]:
        total = r.get("extrapolated_total_s")
        print(f"| {r['name']} | {'-' if total is None else f'{total:.1f}'} |")
    failed_tests = tests is not None and tests["returncode"] not in (0, 5)  # 5: no CUDA tests collected
    failed_checks = any(d.get("ok") is False for d in result["doctor"])
    return 1 if failed_tests or failed_checks else 0


if __name__ == "__main__":
    sys.exit(main())
