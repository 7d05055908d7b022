"""hlbd_fast.bench: rows from the same weights and order, counted syncs, failed rows reported, JSON and table."""

from __future__ import annotations

import gc
import json
import multiprocessing
import time
import weakref

import pytest
import torch
from conftest import TinySeq2Seq, ragged_pairs

from hlbd_fast import FastTrainer, bench, cli
from hlbd_fast.bench import ROWS, BenchError, RowRecipe, RowResult, RowSpec, compare_rows, format_table, resolve_rows, run_bench
from hlbd_fast.presets import Preset
from hlbd_fast.strategies import DeferredLossSync, Strategy
from hlbd_fast.strategies.cuda_graph import CUDAGraphStep
from hlbd_fast.strategies.data import DataLoaderWorkers, DevicePreload

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
    assert "| row | epochs | s/epoch | one-off s | speedup | ratio of |" in table and "| +deferred sync | 2 |" in table
    # sequential: the ratio of two s/epoch figures, each the median of the epochs after the first (1 of 2)
    assert [r["speedup_epochs"] for r in saved["rows"]] == [1, 1, 1, None]
    assert all(r["speedup_rounds"] is None for r in saved["rows"])
    assert "| 1 epoch |" in table


def test_json_rows_are_row_results(report):
    """Each JSON row is a RowResult's to_dict(): the keys in the report's order, and it reads back unchanged."""
    rep, out = report
    saved = json.loads((out / "bench.json").read_text())
    for r in saved["rows"]:
        assert list(RowResult.from_dict(r).to_dict().items()) == list(r.items())
    assert list(saved["rows"][1]) == [
        "name",
        "epochs",
        "error",
        "note",
        "warnings",
        "wall_s",
        "s_per_epoch",
        "epoch_seconds",
        "epoch_rounds",
        "compile_s",
        "final_loss",
        "losses",
        "peak_mem_mb",
        "mem_before_mb",
        "syncs_per_step",
        "micro_batch",
        "accumulation",
        "strategies",
        "info",
        "eval_token_accuracy",
        "speedup",
        "speedup_rounds",
        "speedup_epochs",
        "loss_rel_diff",
        "loss_compared_at_epoch",
    ]
    assert list(saved["rows"][-1]) == [  # the failed row: no figures, no eval column
        "name",
        "epochs",
        "error",
        "note",
        "warnings",
        "wall_s",
        "s_per_epoch",
        "speedup",
        "speedup_rounds",
        "speedup_epochs",
        "final_loss",
        "loss_rel_diff",
        "compile_s",
        "peak_mem_mb",
        "syncs_per_step",
        "losses",
    ]
    assert not RowResult.from_dict(saved["rows"][-1]).trained and RowResult.from_dict(saved["rows"][0]).trained


def test_row_recipes_build_fresh_strategies_and_keep_the_row_names():
    from hlbd_fast.presets import baseline

    cpu = torch.device("cpu")
    assert list(ROWS) == [
        "baseline",
        "+mixed precision",
        "+bigger batch",
        "+batch 32",
        "+workers",
        "+compile",
        "+fused adamw",
        "+deferred sync",
        "+device preload",
        "+grad checkpointing",
        "+trim padding",
        "+fast dropout",
        "+unpad",
        "careful loop",
        "quick",
        "extreme",
        "fastest",
        "fastest fp32",
        "fastest+compile",
    ]
    assert all(isinstance(recipe, RowRecipe) and recipe.name == name for name, recipe in ROWS.items())
    first, second = ROWS["+deferred sync"](cpu), ROWS["+deferred sync"](cpu)
    assert first == RowSpec(first.preset, "replaces EagerLossSync()")
    assert first.preset.strategies[-1] is not second.preset.strategies[-1]  # a trainer owns its strategies
    recipe = RowRecipe("mine", baseline, add=(DeferredLossSync,), replace_role=True, batch_size=8, note="mine")
    spec = recipe(cpu)
    assert [type(s).__name__ for s in spec.preset.strategies] == ["GradientAccumulation", "DeferredLossSync"]
    assert spec.note == "mine; replaces EagerLossSync()" and spec.preset.batch_size == 8
    careful = ROWS["careful loop"](cpu)
    assert (careful.preset.name, careful.preset.batch_size) == ("careful loop", 32)
    assert careful.note.startswith("batch 32, each batch trimmed to its longest row")


def _refuse_work(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("work started although an argument is bad")

    monkeypatch.setattr(bench, "run_bench", refuse)
    monkeypatch.setattr(bench, "reference_data", refuse)


@pytest.mark.parametrize(
    "bad, option",
    [
        (["--rows", "nope"], "--rows"),
        (["--rows", ","], "--rows"),
        (["--epochs", "0"], "--epochs"),
        (["--baseline-epochs", "0"], "--baseline-epochs"),
        (["--threads", "0"], "--threads"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_a_rejected_bench_call_creates_no_out_folder(bad, option, tmp_path, capsys, monkeypatch):
    """Every argument is checked before the --out folder is created: a rejected call leaves nothing behind."""
    _refuse_work(monkeypatch)
    threads = torch.get_num_threads()
    out = tmp_path / "results" / "bench"
    assert cli.main(["bench", "--tiny", "--threads", "1", "--out", str(out), *bad]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f"hlbd-fast bench: error: {option}") and "\n" not in err and captured.out == ""
    assert not (tmp_path / "results").exists()
    assert torch.get_num_threads() == threads  # --threads is applied only once the run goes ahead


def test_a_bench_call_rejected_by_the_parser_or_run_bench_creates_no_out_folder(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--epochs", "x", "--out", str(tmp_path / "cli")])
    assert exit_.value.code == 2 and "--epochs" in capsys.readouterr().err
    with pytest.raises(BenchError, match="unknown row 'nope'"):
        run_bench(rows="nope", device="cpu", out=tmp_path / "api", data=ragged_pairs(n=8), model_factory=TinySeq2Seq)
    with pytest.raises(BenchError, match=r"row_epochs\['baseline'\] 0 must be"):
        run_bench(rows="baseline", device="cpu", out=tmp_path / "api", row_epochs={"baseline": 0}, data=ragged_pairs(n=8), model_factory=TinySeq2Seq)
    assert list(tmp_path.iterdir()) == []


def test_row_names_and_bad_arguments():
    cpu = torch.device("cpu")
    assert resolve_rows("Compile, +fused-adamw,grad_checkpointing", cpu) == ["+compile", "+fused adamw", "+grad checkpointing"]
    assert resolve_rows(None, cpu) == list(bench.CPU_DEFAULT_ROWS)
    assert resolve_rows(None, torch.device("cuda")) == list(ROWS)
    with pytest.raises(BenchError, match="unknown row 'turbo'"):
        resolve_rows("baseline,turbo", cpu)
    with pytest.raises(BenchError, match="--epochs 0 must be an integer >= 1"):
        run_bench(rows="baseline", epochs=0, device="cpu", data=ragged_pairs(n=8), model_factory=TinySeq2Seq)


def test_rows_name_device_preload_and_replace_by_role():
    cpu = torch.device("cpu")
    assert resolve_rows("device-preload,+device preload", cpu) == ["+device preload"]
    with pytest.raises(BenchError, match="unknown row 'gpu-preload'"):  # the row name of 0.1's GPUPreload is gone
        resolve_rows("gpu-preload", cpu)
    spec = ROWS["+device preload"](cpu)
    assert [type(s).__name__ for s in spec.preset.strategies] == ["GradientAccumulation", "EagerLossSync", "DevicePreload"]
    assert spec.note == "" and "GPUPreload" not in repr(spec.preset.strategies)
    bigger = ROWS["+bigger batch"](cpu)  # GradientAccumulation(2) fills the accumulation role: it replaces (8)
    assert [type(s).__name__ for s in bigger.preset.strategies] == ["EagerLossSync", "GradientAccumulation"]
    assert bigger.note.startswith("replaces GradientAccumulation") and bigger.preset.batch_size == 16


def test_cli_prints_the_table_last(tmp_path, capsys, one_thread):
    assert bench.main(["--tiny", "--rows", "deferred-sync", "--epochs", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("s/epoch:") and out[-3].startswith("| +deferred sync | 1 |")
    assert out[-3].split("|")[5].strip() == "-"  # no baseline row: no speed-up
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["config"]["pairs"] == 64 and saved["rows"][0]["error"] is None
    assert bench.main(["--rows", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown row 'nope'" in capsys.readouterr().err


def test_cli_refuses_an_unwritable_out_before_training(tmp_path, capsys, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with caplog.at_level("INFO", logger="hlbd_fast"):
        assert bench.main(["--tiny", "--rows", "baseline", "--epochs", "1", "--out", str(blocker / "results")]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("hlbd-fast bench: error: --out ") and "cannot be written" in err and "\n" not in err
    assert captured.out == "" and not caplog.messages  # no row was built, no epoch ran
    assert blocker.read_text() == "not a folder"
    with pytest.raises(BenchError, match="--out .* cannot be written"):
        run_bench(rows="baseline", epochs=1, device="cpu", out=blocker / "x", data=ragged_pairs(n=8), model_factory=TinySeq2Seq)


def test_time_budget_skips_later_rows(one_thread):
    rep = run_bench(
        rows="baseline,deferred-sync", epochs=1, device="cpu", data=ragged_pairs(n=8), model_factory=TinySeq2Seq, time_budget_s=1e-9, interleave=False
    )
    first, second = rep["rows"]
    assert first["error"] is None and first["s_per_epoch"] > 0  # the first row always runs
    assert second["error"].startswith("skipped: the time budget") and second["speedup"] is None


def test_fastest_fp32_row_is_the_preset_without_autocast():
    from hlbd_fast.presets import fastest

    spec = ROWS["fastest fp32"](torch.device("cpu"))
    names = [type(s).__name__ for s in spec.preset.strategies]
    assert names == [type(s).__name__ for s in fastest("cpu").strategies if type(s).__name__ != "MixedPrecision"]
    assert spec.note.startswith("without MixedPrecision(dtype='auto'") and spec.preset.name == "fastest fp32"
    assert resolve_rows("fastest-fp32", torch.device("cpu")) == ["fastest fp32"]  # loose spelling, as the others


def test_fastest_plus_compile_row_is_the_preset_with_compile():
    from hlbd_fast.presets import fastest

    spec = ROWS["fastest+compile"](torch.device("cpu"))
    names = [type(s).__name__ for s in spec.preset.strategies]
    # FastDropout and Unpad refuse Compile (own masks; a new shape every batch): the row leaves them out and says so
    assert names == [type(s).__name__ for s in fastest("cpu").strategies if type(s).__name__ not in ("FastDropout", "Unpad")] + ["Compile"]
    assert spec.preset.strategies[-1].dynamic is True and spec.preset.batch_size == 32
    assert spec.note == "without Unpad(check=True, multiple_of=None, on_refusal='leave out'), FastDropout(exact=False)"
    FastTrainer(TinySeq2Seq(), strategies=spec.preset.strategies, progress=False)  # builds: no conflict left


def test_interleaved_and_sequential_orders_measure_the_same_training(one_thread, caplog):
    """Interleaving changes when each epoch runs, not what it computes (each row keeps its own random
    stream: dropout is on); the epochs alternate between rows; the speed-up pairs epochs of one round."""
    kwargs = dict(
        rows="baseline,deferred-sync,bigger-batch",
        epochs=2,
        device="cpu",
        data=ragged_pairs(n=32),
        model_factory=lambda: TinySeq2Seq(vocab_size=23, dropout=0.2),
    )
    with caplog.at_level("INFO", logger="hlbd_fast"):
        inter = run_bench(interleave=True, **kwargs)
    epochs_logged = [m.split(":")[0].strip() + m.split("epoch")[1].split()[0] for m in caplog.messages if ": epoch " in m]
    assert epochs_logged == ["baseline1/2", "+deferred sync1/2", "+bigger batch1/2", "baseline2/2", "+deferred sync2/2", "+bigger batch2/2"]
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
        assert r["epoch_rounds"] == [1, 2] and r["paired_rounds"] == [1, 2] and r["speedup_rounds"] == 1
    assert "| 1 round |" in format_table(inter)


def test_time_budget_ends_whole_rounds_only(one_thread):
    """Interleaved, the first round always runs whole: a spent budget stops every row after it, none midway."""
    rep = run_bench(
        rows="baseline,deferred-sync", epochs=3, device="cpu", data=ragged_pairs(n=8), model_factory=TinySeq2Seq, time_budget_s=1e-9, interleave=True
    )
    for r in rep["rows"]:
        assert r["error"] is None and len(r["losses"]) == 1 and r["epochs"] == 1 and r["epoch_rounds"] == [1]
        assert r["note"].endswith("stopped after 1 epoch(s): time budget spent")
        assert r["speedup_rounds"] == 1  # the only round both completed
    assert rep["rows"][1]["speedup"] == pytest.approx(rep["rows"][0]["epoch_seconds"][0] / rep["rows"][1]["epoch_seconds"][0])


class _Sleep(Strategy):
    """Makes every epoch of its row last at least ``seconds`` (a slow row, without a busy CPU)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_epoch_end(self, trainer, record) -> None:
        time.sleep(self.seconds)


def _preset_row(*strategies: Strategy, name: str = "row") -> Preset:
    return Preset(name=name, strategies=(DeferredLossSync(), *strategies), batch_size=4)


def test_time_budget_decides_each_round_from_the_last_one(one_thread):
    """A round takes about 1 s (the sleeping row): with 2.5 s, rounds 1 and 2 fit (about 2 s), a third would not."""
    table = {"baseline": lambda dev: _preset_row(_Sleep(1.0), name="baseline"), "other": lambda dev: _preset_row()}
    rep = run_bench(
        rows="baseline,other", epochs=4, device="cpu", data=ragged_pairs(n=8), model_factory=TinySeq2Seq, row_table=table, time_budget_s=2.5, interleave=True
    )
    for r in rep["rows"]:
        assert r["error"] is None and r["epoch_rounds"] == [1, 2] and r["epochs"] == 2
        assert r["note"] == "stopped after 2 epoch(s): time budget spent"
    other = rep["rows"][1]
    assert other["paired_rounds"] == [1, 2] and other["speedup_rounds"] == 1
    assert other["speedup"] == pytest.approx(rep["rows"][0]["epoch_seconds"][1] / other["epoch_seconds"][1])


def _row(name, seconds, rounds=None, s_per_epoch=None):
    return RowResult(
        name=name,
        epochs=len(seconds),
        epoch_seconds=seconds,
        epoch_rounds=rounds,
        losses=[1.0] * len(seconds),
        s_per_epoch=s_per_epoch if s_per_epoch is not None else seconds[-1],
    )


def test_ratios_come_only_from_rounds_both_rows_completed():
    base = _row("baseline", [10.0, 4.0, 6.0, 8.0], [1, 2, 3, 4])
    three = _row("three rounds", [5.0, 2.0, 2.0], [1, 2, 3])  # rounds 2 and 3: ratios 2 and 3
    one = _row("one round", [4.0], [1])  # round 1 only: its ratio, not the baseline's later rounds
    late = _row("from round 3", [2.0, 4.0], [3, 4])  # paired rounds 3 and 4: round 4 only (the first is left out)
    plain = _row("no rounds given", [5.0, 2.0, 2.0])  # epoch i ran in round i
    compare_rows([base, three, one, late, plain], paired=True)
    assert (three.speedup, three.speedup_rounds, three.paired_rounds) == (2.5, 2, [1, 2, 3])
    assert three.speedup_per_round == [2.0, 2.0, 3.0]
    assert (one.speedup, one.speedup_rounds) == (2.5, 1)
    assert (late.speedup, late.speedup_rounds) == (2.0, 1)
    assert (plain.speedup, plain.speedup_rounds) == (2.5, 2)
    assert (base.speedup, base.speedup_rounds) == (1.0, 3)
    # sequential: the ratio of the s/epoch figures; the thinner of the two rests on (epochs - 1) epochs
    seq = [_row("baseline", [10.0, 4.0, 6.0], s_per_epoch=5.0), _row("x", [3.0, 2.0], s_per_epoch=2.0)]
    compare_rows(seq)
    assert (seq[1].speedup, seq[1].speedup_epochs, seq[1].speedup_rounds) == (2.5, 1, None)


class _CountingGraphStep(CUDAGraphStep):
    """CUDAGraphStep that counts close() calls (on CPU it runs the eager step)."""

    def __init__(self) -> None:
        super().__init__()
        self.released = 0

    def close(self) -> None:
        self.released += 1
        super().close()


class _Watch(Strategy):
    """Calls ``see(trainer, when, epoch)`` at the start and end of every epoch."""

    def __init__(self, see) -> None:
        self.see = see

    def setup(self, trainer) -> None:
        self.see(trainer, "setup", None)

    def on_epoch_start(self, trainer, epoch) -> None:
        self.see(trainer, "start", epoch)

    def on_epoch_end(self, trainer, record) -> None:
        self.see(trainer, "end", record.epoch - 1)


def test_rows_keep_their_workers_across_epochs_and_free_them_when_done(one_thread):
    """One trainer per row: its DataLoader workers serve every epoch of the row (the bench's one fit per epoch
    does not restart them), and once the row is done its workers stop, its graphs are released and its trainer
    is dropped, while the other rows go on."""
    made, seen = {}, []

    def workers_row(dev):
        made["workers"] = DataLoaderWorkers(num_workers=1)

        def see(trainer, when, epoch):
            if when == "setup":
                made["workers_trainer"] = weakref.ref(trainer)
            else:
                pids = {p.pid for p in multiprocessing.active_children()}
                seen.append(("workers", when, epoch, trainer.roles.batches.workers_running, pids))

        return _preset_row(made["workers"], _Watch(see))

    def graph_row(dev):
        made["graph"] = _CountingGraphStep()
        return _preset_row(DevicePreload(), made["graph"])

    def baseline_row(dev):
        def see(trainer, when, epoch):
            if when == "start" and epoch == 2:  # round 3: the two other rows finished in round 2
                gc.collect()
                made["at_round_3"] = (
                    made["workers"].workers_running,
                    made["graph"].released,
                    made["workers_trainer"]() is None,
                    {p.pid for p in multiprocessing.active_children()},
                )

        return _preset_row(_Watch(see), name="baseline")

    table = {"baseline": baseline_row, "workers": workers_row, "graphs": graph_row}
    rep = run_bench(
        rows="baseline,workers,graphs",
        epochs=3,
        row_epochs={"workers": 2, "graphs": 2},
        device="cpu",
        data=ragged_pairs(n=16),
        model_factory=TinySeq2Seq,
        row_table=table,
        interleave=True,
    )
    assert [r["error"] for r in rep["rows"]] == [None, None, None]
    states = [(when, epoch, running) for _, when, epoch, running, _ in seen]
    # built at the first epoch's first batch, then kept: running from the end of epoch 1 to the start of epoch 2
    assert states == [("start", 0, False), ("end", 0, True), ("start", 1, True), ("end", 1, True)]
    worker_pids = seen[1][4] - seen[0][4]
    assert len(worker_pids) == 1 and worker_pids <= seen[2][4] and worker_pids <= seen[3][4]  # the same worker process
    running, released, trainer_dropped, children = made["at_round_3"]
    assert running is False and released == 1 and trainer_dropped
    assert not worker_pids & children  # the worker process is gone before the baseline's third epoch
    workers, graphs = rep["rows"][1], rep["rows"][2]
    assert workers["epoch_rounds"] == [1, 2] and workers["speedup_rounds"] == 1
    assert any("CUDAGraphStep" in w for w in graphs["warnings"])  # CPU: the eager step, with its warning


def test_the_careful_loop_and_unpad_rows_and_the_eval_accuracy_column(one_thread):
    """A hand-written loop's work (batch 32, trimmed, read every step), +unpad on the reference model, token accuracy."""
    from hlbd_fast.models import Seq2SeqTransformer

    def model():
        return Seq2SeqTransformer(vocab_size=23, d_model=16, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=32, dropout=0.0, max_length=16)

    rep = run_bench(rows="baseline,careful loop,+unpad", epochs=1, device="cpu", model_factory=model, data=ragged_pairs(n=64), interleave=False)
    rows = {r["name"]: r for r in rep["rows"]}
    careful = rows["careful loop"]
    assert careful["error"] is None and careful["micro_batch"] == 32 and careful["accumulation"] == 1
    assert careful["syncs_per_step"] == 1.5  # a read at each of 2 steps, and the epoch's own read
    assert any("TrimPadding" in s for s in careful["strategies"])
    assert rows["+unpad"]["error"] is None and rows["+unpad"]["losses"] == pytest.approx(rows["baseline"]["losses"], rel=1e-5)
    for r in rows.values():
        assert 0.0 <= r["eval_token_accuracy"] <= 1.0
    assert "eval token acc" in format_table(rep)
