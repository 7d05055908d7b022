"""hlbd_fast.tune: proofs against the plain loop, verdicts, the greedy combination, the report, the command."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import TinySeq2Seq, clone, ragged_pairs

from hlbd_fast import FastTrainer, TuneReport, tune
from hlbd_fast.models import Seq2SeqTransformer
from hlbd_fast.strategies import DeferredLossSync, FusedAdamW, Unpad
from hlbd_fast.tuning import PLAIN, Candidate, TuneError, default_candidates
from hlbd_fast.tuning import main as tune_main

BUDGET = 6.0  # seconds: tiny models run dozens of rounds in it


class LeakyReference(Seq2SeqTransformer):
    """Attends to padded source keys, as the user's APTModel does: padding reaches real positions."""

    def source_mask(self, src):
        return torch.ones_like(super().source_mask(src))


def small(cls=Seq2SeqTransformer, dropout: float = 0.0) -> Seq2SeqTransformer:
    torch.manual_seed(0)
    return cls(vocab_size=23, d_model=16, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=32, dropout=dropout, max_length=32)


def padded(n: int = 48, extra: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    src, tgt = ragged_pairs(n=n)
    z = torch.zeros(n, extra, dtype=torch.long)
    return torch.cat([src, z], 1), torch.cat([tgt, z], 1)


def cpu_candidates(*names: str) -> tuple[Candidate, ...]:
    """The default CPU candidates of those names (bf16 left out: it is a candidate only on CPUs with native bf16)."""
    pool = {c.name: c for c in default_candidates("cpu")}
    return tuple(pool[n] for n in names)


def row(report: TuneReport, name: str, stage: str = "alone"):
    return next(r for r in report.rows if r.name == name and r.stage == stage)


@pytest.fixture(scope="module")
def leaky_report() -> TuneReport:
    names = ("deferred sync", "fused adamw", "trim padding", "unpad")
    return tune(small(LeakyReference), padded(), batch_size=8, budget_s=BUDGET, candidates=cpu_candidates(*names), progress=False)


# ---------------------------------------------------------------------------- verdicts and the choice
def test_tune_refuses_trimming_a_leaking_model_with_the_measured_difference(leaky_report):
    for name, strategy in (("trim padding", "TrimPadding"), ("unpad", "Unpad")):
        r = row(leaky_report, name)
        assert r.verdict == "refused" and r.speedup is None
        assert r.reason.startswith(f"{strategy} refused this model") and "logits" in r.reason and "changed" in r.reason
    chosen = " ".join(leaky_report.best.strategies)
    assert "TrimPadding" not in chosen and "Unpad" not in chosen
    assert leaky_report.best.verdict in ("exact", "rounding")


def test_the_proofs_compare_every_candidate_with_the_plain_loop(leaky_report):
    assert row(leaky_report, PLAIN).verdict == "exact"
    sync = row(leaky_report, "deferred sync")
    assert sync.verdict == "exact" and sync.loss_diff == 0.0 and sync.weight_diff == 0.0  # bookkeeping only
    fused = row(leaky_report, "fused adamw")
    assert fused.verdict in ("exact", "rounding") and fused.weight_diff <= 1e-4


def test_tune_leaves_the_callers_random_stream_as_it_was():
    model, data = TinySeq2Seq(), ragged_pairs(n=16)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tune(model, data, batch_size=8, budget_s=BUDGET, candidates=cpu_candidates("deferred sync"), progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_the_budget_ends_whole_rounds_and_every_ratio_says_what_it_rests_on(leaky_report):
    for stage in ("alone", "combined"):
        timed = [r for r in leaky_report.rows if r.stage == stage and r.speedup is not None and r.name != PLAIN]
        assert timed, stage
        assert len({r.rounds for r in timed}) == 1 and timed[0].rounds >= 1  # every row of a stage ran the same rounds
    assert leaky_report.spent_s < BUDGET + 10  # a round started only when it fit; the last one may end a little after


def test_the_chosen_preset_trains_what_the_same_strategies_listed_by_hand_train(leaky_report):
    data = padded()
    a, b = small(LeakyReference), small(LeakyReference)
    kw = {"progress": False, "seed": 3}
    ha = FastTrainer.from_preset(a, leaky_report.preset, **kw).fit(data, 2)
    by_hand = [eval(code, {"DeferredLossSync": DeferredLossSync, "FusedAdamW": FusedAdamW}) for code in leaky_report.best.strategies]
    hb = FastTrainer(b, strategies=by_hand, batch_size=leaky_report.batch_size, lr=leaky_report.lr, **kw).fit(data, 2)
    assert ha.losses == hb.losses
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # each access builds fresh strategies: two trainers may take the preset at once
    FastTrainer.from_preset(small(), leaky_report.preset, progress=False)
    FastTrainer.from_preset(small(), leaky_report.preset, progress=False)


def test_the_report_prints_the_table_and_the_code_and_saves_json(leaky_report, tmp_path):
    text = str(leaky_report)
    assert "verdict" in text and "refused" in text and "chosen: " in text
    assert "FastTrainer.from_preset(model, preset)" in text
    path = tmp_path / "tune.json"
    leaky_report.save(path)
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["chosen"] == leaky_report.chosen and len(saved["rows"]) == len(leaky_report.rows)
    assert saved["code"] == leaky_report.code() and "machine" in saved


def test_tune_accepts_unpad_on_a_model_that_masks_padding():
    """Proven and timed; whether it is chosen is a question of speed (on a tiny model it is slower: the benchmark
    checks the choice on the reference model)."""
    report = tune(small(), padded(), batch_size=8, budget_s=BUDGET, candidates=cpu_candidates("trim padding", "unpad"), progress=False)
    unpad = row(report, "unpad")
    assert unpad.verdict == "rounding" and unpad.loss_diff <= 1e-4 and unpad.speedup is not None
    assert row(report, "trim padding").verdict in ("exact", "rounding")


def test_a_dropout_strategy_gets_the_random_stream_verdict_and_accept_can_leave_it_out():
    report = tune(small(dropout=0.1), padded(), batch_size=8, budget_s=BUDGET, candidates=cpu_candidates("fast dropout"), progress=False)
    r = row(report, "fast dropout")
    assert r.verdict == "random stream" and r.loss_diff == 0.0  # with dropout off, it computes the plain loop's numbers
    strict = tune(
        small(dropout=0.1), padded(), batch_size=8, budget_s=BUDGET, candidates=cpu_candidates("fast dropout"), accept=("exact", "rounding"), progress=False
    )
    assert row(strict, "fast dropout").verdict == "refused" and "accept=" in row(strict, "fast dropout").reason
    assert strict.chosen == PLAIN and strict.preset.strategies == ()


def test_a_strategy_the_model_cannot_run_is_not_tried_and_says_why():
    pool = cpu_candidates("unpad", "fast dropout", "deferred sync")
    report = tune(TinySeq2Seq(), ragged_pairs(n=32), batch_size=8, budget_s=BUDGET, candidates=pool, progress=False)
    r = row(report, "unpad")
    assert r.verdict == "not tried" and "Unpad cannot run TinySeq2Seq" in r.reason
    r = row(report, "fast dropout")  # dropout p=0: a random stream of nothing
    assert r.verdict == "not tried" and "no nn.Dropout with p > 0" in r.reason


# ---------------------------------------------------------------------------- a trainer subclass
class KeywordOnly(TinySeq2Seq):
    """A model the default forward cannot call: it takes keyword arguments only."""

    def forward(self, *, source, target_in):
        return super().forward(source, target_in)


class KeywordTrainer(FastTrainer):
    def forward_logits(self, model, batch):
        src, tgt = batch[0], batch[1]
        return model(source=src, target_in=tgt[:, :-1]), tgt[:, 1:]


def test_tune_measures_a_trainer_subclass_with_its_own_forward():
    torch.manual_seed(0)
    model = KeywordOnly()
    with pytest.raises(TuneError, match="the plain loop cannot train one step"):
        tune(model, ragged_pairs(n=32), batch_size=8, budget_s=BUDGET, progress=False)
    report = tune(
        model,
        ragged_pairs(n=32),
        batch_size=8,
        budget_s=BUDGET,
        candidates=cpu_candidates("deferred sync", "trim padding"),
        trainer_class=KeywordTrainer,
        progress=False,
    )
    assert row(report, "deferred sync").verdict == "exact"
    assert row(report, "trim padding").verdict in ("exact", "rounding")  # its proof runs the subclass's forward too
    trainer = KeywordTrainer.from_preset(clone(model), report.preset, progress=False)
    assert trainer.fit(ragged_pairs(n=32), 1).losses


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"model": "a model"}, "model must be a torch.nn.Module"),
        ({"data": [1, 2, 3]}, "data must be a (src, tgt) pair"),
        ({"data": (torch.zeros(4, 5), torch.zeros(4, 5))}, "2-D integer tensors"),
        ({"data": (torch.full((4, 5), 40), torch.full((4, 5), 4))}, "token id 40, but the model's vocabulary has 23 ids"),
        ({"budget_s": 0}, "budget_s must be a positive number"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"trainer_class": dict}, "trainer_class must be FastTrainer or a subclass"),
        ({"strategies": [Unpad()]}, "tune sets strategies itself"),
        ({"accept": ("refused",)}, "accept=('refused',) must be"),
    ],
)
def test_bad_input_is_refused_before_anything_trains(kwargs, words):
    args = {"model": TinySeq2Seq(), "data": ragged_pairs(n=16), "budget_s": BUDGET, "progress": False, **kwargs}
    with pytest.raises(TuneError, match=words.replace("(", r"\(").replace(")", r"\)")):
        tune(args.pop("model"), args.pop("data"), **args)


def test_a_budget_too_small_for_two_rounds_names_the_minimum():
    with pytest.raises(TuneError, match=r"budget_s=0.001 is too small .* give budget_s >= \d+"):
        tune(small(), padded(), batch_size=8, budget_s=0.001, progress=False)


# ---------------------------------------------------------------------------- the command
def test_the_command_refuses_a_bad_factory_and_budget_with_status_2(capsys, tmp_path, monkeypatch):
    assert tune_main(["--model", "no_such_module_here:factory", "--device", "cpu"]) == 2
    assert "hlbd-fast tune: error: --model no_such_module_here:factory: cannot import" in capsys.readouterr().err
    assert tune_main(["--json", str(tmp_path), "--device", "cpu"]) == 2
    assert "--json" in capsys.readouterr().err
    (tmp_path / "tune_bad_factories.py").write_text("def nothing():\n    return 3\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert tune_main(["--model", "tune_bad_factories:nothing", "--device", "cpu"]) == 2
    assert "the factory returned int; return a model or a (model, data) pair" in capsys.readouterr().err
    assert tune_main(["--budget", "0", "--device", "cpu"]) == 2  # the reference model: refused before it trains
    assert "budget_s must be a positive number" in capsys.readouterr().err
    assert tune_main(["--accept", "exact,fast", "--device", "cpu"]) == 2
    assert "accept=('exact', 'fast') must be" in capsys.readouterr().err


def test_the_command_tunes_a_factory_model_and_writes_json(tmp_path, monkeypatch, capsys):
    (tmp_path / "tune_factory_mod.py").write_text(
        "import torch\n"
        "from hlbd_fast.models import Seq2SeqTransformer\n"
        "def factory():\n"
        "    torch.manual_seed(0)\n"
        "    src = torch.randint(4, 23, (24, 8)); tgt = torch.randint(4, 23, (24, 9)); src[:, 6:] = 0; tgt[:, 7:] = 0\n"
        "    model = Seq2SeqTransformer(vocab_size=23, d_model=16, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=32, dropout=0.0, max_length=32)\n"
        "    return model, (src, tgt)\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "report.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status = tune_main(
            ["--model", "tune_factory_mod:factory", "--budget", "10", "--batch-size", "8", "--device", "cpu", "--no-progress", "--json", str(out)]
        )
    assert status == 0
    printed = capsys.readouterr().out
    assert "chosen: " in printed and json.loads(out.read_text(encoding="utf-8"))["model"] == "Seq2SeqTransformer"


def test_the_doctor_and_tune_agree_on_a_leaking_model(leaky_report):
    from hlbd_fast.doctor import diagnose

    d = diagnose(small(LeakyReference), padded(), steps=2, warmup=1, batch_size=8, device="cpu")
    assert d.padding_price["trim_refused"] and row(leaky_report, "trim padding").verdict == "refused"
    assert d.padding_price["unpad_refused"] and row(leaky_report, "unpad").verdict == "refused"
    recommended = {s for r in d.recommendations for s in r.strategies}
    assert not recommended & {"TrimPadding", "Unpad"}


def test_a_candidate_brings_along_what_its_declaration_requires():
    """CUDAGraphStep requires batches on the device: its rows bring DevicePreload first, once (on a CPU it runs eagerly)."""
    from hlbd_fast.strategies import CUDAGraphStep, DevicePreload

    pool = (Candidate("graphs", CUDAGraphStep), Candidate("device preload", DevicePreload))
    report = tune(TinySeq2Seq(), ragged_pairs(n=64), batch_size=8, budget_s=BUDGET, candidates=pool, progress=False)
    graphs = row(report, "graphs")
    assert graphs.strategies == ["DevicePreload()", "CUDAGraphStep()"] and graphs.verdict == "exact" and graphs.speedup is not None
    assert graphs.steps == report.proof_steps + CUDAGraphStep().warmup_steps + 2  # compared past the capture, on a replay
    for r in report.rows:
        assert r.strategies.count("DevicePreload()") <= 1, r
