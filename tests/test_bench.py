"""hlbd_fast.bench: rows from the same weights and order, counted syncs, failed rows reported, JSON and table."""

from __future__ import annotations

import json

import pytest
import torch

from hlbd_fast import FastTrainer, bench
from hlbd_fast.bench import ROWS, BenchError, format_table, resolve_rows, run_bench
from conftest import TinySeq2Seq, ragged_pairs

ROW_KEYS = {"name", "s_per_epoch", "speedup", "final_loss", "loss_rel_diff", "compile_s", "peak_mem_mb", "syncs_per_step", "losses", "error"}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _broken(device):
    raise ImportError("hlbd_fast.strategies.nothing is not there")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("bench")
    table = dict(ROWS, broken=_broken)
    try:
        rep = run_bench(
            rows="baseline,deferred sync,+BIGGER-batch,broken",
            epochs=2,
            device="cpu",
            out=out,
            model_factory=lambda: TinySeq2Seq(vocab_size=23),
            data=ragged_pairs(n=32),  # baseline: 8 micro-batches of 4 = one optimizer step per epoch
            row_table=table,
            interleave=False,  # one row after the other: each row's peak memory is measured
        )
    finally:
        torch.set_num_threads(before)
    return rep, out


def test_rows_share_weights_and_order(report):
    rep, _ = report
    rows = {r["name"]: r for r in rep["rows"]}
    assert list(rows) == ["baseline", "+deferred sync", "+bigger batch", "broken"]
    base, deferred, bigger = rows["baseline"], rows["+deferred sync"], rows["+bigger batch"]
    # DeferredLossSync changes only when the loss is read: same losses from the same start and order
    assert deferred["losses"] == base["losses"] and deferred["loss_rel_diff"] == 0.0
    assert base["speedup"] == 1.0 and base["loss_rel_diff"] == 0.0
    assert bigger["micro_batch"] == 16 and bigger["accumulation"] == 2
    assert bigger["losses"] != base["losses"]  # 'micro_batch' normalisation: the means differ a little
    assert bigger["loss_rel_diff"] == pytest.approx(abs(bigger["final_loss"] - base["final_loss"]) / base["final_loss"])
    assert deferred["note"] == "replaces EagerLossSync()"
    assert all(len(r["losses"]) == 2 and r["s_per_epoch"] > 0 and r["peak_mem_mb"] > 0 for r in (base, deferred, bigger))


def test_syncs_are_counted(report):
    rows = {r["name"]: r for r in report[0]["rows"]}
    # baseline reads after each of 8 micro-batches plus once at the epoch's end, one step per epoch
    assert rows["baseline"]["syncs_per_step"] == 9.0
    assert rows["+deferred sync"]["syncs_per_step"] == 1.0
    assert rows["+bigger batch"]["syncs_per_step"] == 3.0  # 2 micro-batches + the epoch's end


def test_failed_row_is_reported_not_raised(report):
    broken = report[0]["rows"][-1]
    assert broken["error"] == "ImportError: hlbd_fast.strategies.nothing is not there"
    assert broken["s_per_epoch"] is None and broken["speedup"] is None
    assert "failed: ImportError" in format_table(report[0])


def test_json_schema(report):
    rep, out = report
    saved = json.loads((out / "bench.json").read_text())
    assert set(saved) == {"machine", "config", "rows"}
    assert {"cpu", "gpu", "torch", "torch_threads", "date"} <= set(saved["machine"])
    assert saved["machine"]["torch_threads"] == 1
    assert {"epochs", "rows", "pairs", "seed"} <= set(saved["config"]) and saved["config"]["epochs"] == 2
    for r in saved["rows"]:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
    table = format_table(rep)
    assert "| row | epochs | s/epoch |" in table and "| +deferred sync | 2 |" in table


def test_row_names_and_bad_arguments():
    cpu = torch.device("cpu")
    assert resolve_rows("Compile, +fused-adamw,grad_checkpointing", cpu) == ["+compile", "+fused adamw", "+grad checkpointing"]
    assert resolve_rows(None, cpu) == list(bench.CPU_DEFAULT_ROWS)
    assert resolve_rows(None, torch.device("cuda")) == list(ROWS)
    with pytest.raises(BenchError, match="unknown row 'turbo'"):
        resolve_rows("baseline,turbo", cpu)
    with pytest.raises(BenchError, match="--epochs 0 must be an integer >= 1"):
        run_bench(rows="baseline", epochs=0, device="cpu", data=ragged_pairs(n=8), model_factory=TinySeq2Seq)


def test_cli_prints_the_table_last(tmp_path, capsys, one_thread):
    assert bench.main(["--tiny", "--rows", "deferred-sync", "--epochs", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("s/epoch:") and out[-3].startswith("| +deferred sync | 1 |")
    assert out[-3].split("|")[5].strip() == "-"  # no baseline row: no speed-up
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["config"]["pairs"] == 64 and saved["rows"][0]["error"] is None
    assert bench.main(["--rows", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown row 'nope'" in capsys.readouterr().err


def test_time_budget_skips_later_rows(one_thread):
    rep = run_bench(rows="baseline,deferred-sync", epochs=1, device="cpu", data=ragged_pairs(n=8),
                    model_factory=TinySeq2Seq, time_budget_s=1e-9)
    first, second = rep["rows"]
    assert first["error"] is None and first["s_per_epoch"] > 0  # the first row always runs
    assert second["error"].startswith("skipped: the time budget") and second["speedup"] is None


def test_fastest_plus_compile_row_is_the_preset_with_compile():
    from hlbd_fast.presets import fastest

    spec = ROWS["fastest+compile"](torch.device("cpu"))
    names = [type(s).__name__ for s in spec.preset.strategies]
    # FastDropout refuses Compile (the compiled model draws its own masks): the row leaves it out and says so
    assert names == [type(s).__name__ for s in fastest("cpu").strategies if type(s).__name__ != "FastDropout"] + ["Compile"]
    assert spec.preset.strategies[-1].dynamic is True and spec.preset.batch_size == 32
    assert spec.note == "without FastDropout(exact=False)"
    FastTrainer(TinySeq2Seq(), strategies=spec.preset.strategies, progress=False)  # builds: no conflict left


def test_interleaved_and_sequential_orders_measure_the_same_training(one_thread, caplog):
    """Interleaving changes when each epoch runs, not what it computes (each row keeps its own random
    stream: dropout is on); the epochs alternate between rows; the speed-up pairs epochs of one round."""
    kwargs = dict(rows="baseline,deferred-sync,bigger-batch", epochs=2, device="cpu", data=ragged_pairs(n=32),
                  model_factory=lambda: TinySeq2Seq(vocab_size=23, dropout=0.2))
    with caplog.at_level("INFO", logger="hlbd_fast"):
        inter = run_bench(interleave=True, **kwargs)
    epochs_logged = [m.split(":")[0].strip() + m.split("epoch")[1].split()[0] for m in caplog.messages if ": epoch " in m]
    assert epochs_logged == ["baseline1/2", "+deferred sync1/2", "+bigger batch1/2",
                             "baseline2/2", "+deferred sync2/2", "+bigger batch2/2"]
    seq = run_bench(interleave=False, **kwargs)
    assert inter["config"]["order"].startswith("interleaved") and seq["config"]["order"].startswith("sequential")
    for a, b in zip(inter["rows"], seq["rows"]):
        assert a["name"] == b["name"] and a["error"] is None
        assert a["losses"] == b["losses"]
        assert a["syncs_per_step"] == b["syncs_per_step"]
    assert all(r["peak_mem_mb"] is None for r in inter["rows"])  # not measured with every trainer alive
    assert inter["rows"][1]["losses"] == inter["rows"][0]["losses"]  # deferred sync: the baseline's losses, dropout on
    assert "order: interleaved" in format_table(inter)
    for r in inter["rows"]:
        b, x = inter["rows"][0]["epoch_seconds"][1], r["epoch_seconds"][1]
        assert r["speedup"] == pytest.approx(b / x)  # round 2 against round 2


def test_time_budget_cuts_interleaved_rows_short(one_thread):
    rep = run_bench(rows="baseline,deferred-sync", epochs=3, device="cpu", data=ragged_pairs(n=8),
                    model_factory=TinySeq2Seq, time_budget_s=1e-9, interleave=True)
    first, second = rep["rows"]
    assert first["error"] is None and len(first["losses"]) == 3  # the first row always runs
    assert second["error"].startswith("skipped: the time budget") and second["speedup"] is None
