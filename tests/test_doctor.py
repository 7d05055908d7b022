"""hlbd_fast.doctor: it must point at the module that costs the time and count its host syncs."""

from __future__ import annotations

import json
import os
import textwrap
import warnings
from collections import Counter

import pytest
import torch
from conftest import TinySeq2Seq, ragged_pairs
from cuda_standin import StandInBackend
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hlbd_fast import DeferredLossSync, EagerLossSync, FastDropout, GradientAccumulation, Strategy, doctor
from hlbd_fast.doctor import Diagnosis, DoctorError, diagnose, main
from hlbd_fast.doctor.probe import is_sync_warning
from hlbd_fast.strategies.cuda_graph import CUDAGraphStep
from hlbd_fast.strategies.data import DevicePreload
from hlbd_fast.strategies.dropout import torch_draws_dropout_serially
from hlbd_fast.strategies.padding import TrimPadding
from hlbd_fast.strategies.unpad import Unpad

BATCH = 8
HEADS = 4
ITEMS_PER_SAMPLE = 1 + HEADS


class SlowStats(nn.Module):
    """Loops over the batch and the heads in Python and reads statistics back (.item()), like the user's attention."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for b in range(x.shape[0]):
            xb = self.proj(x[b])
            peak = xb.max().item()
            heads = []
            for h in xb.chunk(HEADS, dim=-1):
                w = torch.softmax(h @ h.T / (1.0 + h.abs().mean().item()), dim=-1)
                heads.append(w @ h)
            outs.append(torch.cat(heads, dim=-1) * (1.0 + 0.0 * peak))
        return torch.stack(outs)


class SlowModel(nn.Module):
    """An otherwise normal tiny seq2seq model with one slow module inside."""

    def __init__(self, vocab: int = 23, d: int = 16) -> None:
        super().__init__()
        self.vocab_size = vocab
        self.emb = nn.Embedding(vocab, d)
        self.stats = SlowStats(d)
        self.out = nn.Linear(d, vocab)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        ctx = self.emb(src).mean(1, keepdim=True)
        return self.out(self.stats(self.emb(tgt_in) + ctx))


@pytest.fixture(scope="module")
def one_thread():
    # tiny matmuls on a shared 2-core machine: one intra-op thread keeps timings about the model
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def slow_diagnosis(one_thread) -> tuple[Diagnosis, SlowModel, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = SlowModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = diagnose(model, ragged_pairs(n=48), steps=4, batch_size=BATCH, warmup=1)
    return d, model, before


def test_slow_module_ranked_first_with_its_syncs(slow_diagnosis):
    d, _, _ = slow_diagnosis
    first = d.top_modules[0]
    assert (first.name, first.cls) == ("stats", "SlowStats"), [m.label for m in d.top_modules]
    assert first.label == "stats (SlowStats)"
    assert first.calls == pytest.approx(1.0)
    # its Linear runs once per sample: the loop shows as the child's call count
    assert first.max_child_calls == pytest.approx(BATCH) and "stats.proj" in first.child
    mine = [s for s in d.sync_sources if s.module == "stats (SlowStats)"]
    assert sum(s.per_step for s in mine) >= BATCH * ITEMS_PER_SAMPLE
    assert {s.op for s in mine} == {"aten::_local_scalar_dense"}
    assert d.syncs_per_step is not None and d.syncs_per_step >= BATCH * ITEMS_PER_SAMPLE
    assert "test_doctor.py" in d.sync_locations["stats (SlowStats) | aten::_local_scalar_dense"]


def test_phases_add_up_and_model_untouched(slow_diagnosis):
    d, model, before = slow_diagnosis
    assert d.step_s > 0 and d.timed_step_s > 0
    assert set(d.phases) == {"data", "forward", "backward", "optimizer", "loss read-back", "other"}
    assert all(v >= 0 for v in d.phases.values())
    assert sum(d.phases.values()) == pytest.approx(d.timed_step_s, rel=1e-6)
    assert d.phases["forward"] > 0 and d.phases["backward"] > 0 and d.phases["optimizer"] > 0
    # module self times fit inside the forward phase
    assert sum(m.self_s for m in d.top_modules) <= d.phases["forward"] * 1.001
    assert d.device_s is None and d.device == "cpu"
    assert 0 < d.padding["trimmable_fraction"] <= d.padding["pad_fraction"] < 1
    for k, v in model.state_dict().items():  # diagnose trained a copy
        assert torch.equal(v, before[k]), k


def test_report_names_the_module_and_a_recommendation(slow_diagnosis):
    d, _, _ = slow_diagnosis
    text = str(d)
    assert "stats (SlowStats)" in text
    top = next(r for r in d.recommendations if "SlowStats.forward" in r.text)
    assert "host syncs per step" in top.text and "Python loop" in top.text and "test_doctor.py" in top.text
    assert f"[{100 * top.share:.0f}%] `SlowStats.forward` (stats): " in text
    assert [r.share for r in d.recommendations] == sorted((r.share for r in d.recommendations), reverse=True)
    assert "device time: n/a on CPU" in text
    data = json.loads(json.dumps(d.to_dict()))
    assert data["top_modules"][0]["label"] == "stats (SlowStats)"
    assert data["sync_sources"][0]["module"] == "stats (SlowStats)"
    assert top.text in [r["text"] for r in data["recommendations"]]


def test_loss_read_back_counted_and_deferred_sync_recommended(one_thread):
    """EagerLossSync reads the loss every micro-batch: 2 syncs per step with accumulation 2."""
    torch.manual_seed(0)
    d = diagnose(TinySeq2Seq(), ragged_pairs(n=40), strategies=[GradientAccumulation(2), EagerLossSync()], steps=3, batch_size=4, warmup=1)
    assert d.accumulation == 2
    assert d.sync_sources == [("(loss read-back)", "aten::tolist (loss read-back)", 2.0)]
    assert d.syncs_per_step == 2.0
    assert any("DeferredLossSync" in r.strategies for r in d.recommendations)
    # the plain loop without per-micro-batch reads has no sync at all (this model has none);
    # 30 columns of padding after every row are found and TrimPadding is suggested
    torch.manual_seed(0)
    src, tgt = ragged_pairs(n=40)
    padded = (torch.nn.functional.pad(src, (0, 30)), torch.nn.functional.pad(tgt, (0, 30)))
    clean = diagnose(TinySeq2Seq(), padded, steps=2, batch_size=4, warmup=0)
    assert clean.syncs_per_step == 0.0 and clean.sync_sources == []
    assert not any("DeferredLossSync" in r.strategies for r in clean.recommendations)
    assert clean.padding["trimmable_fraction"] >= (30 + 30) / (40 + 42)
    assert any(r.strategies == ["TrimPadding"] for r in clean.recommendations)


def test_step_read_backs_counted_and_hooks_removed(one_thread):
    """A read after every step comes after on_step_end: the pass's last one still counts, the epoch's closing read does not."""
    torch.manual_seed(0)
    model = TinySeq2Seq()
    d = diagnose(model, ragged_pairs(n=40), strategies=[DeferredLossSync(every=1)], steps=3, batch_size=4, warmup=1, copy_model=False)
    assert d.sync_sources == [("(loss read-back)", "aten::tolist (loss read-back)", 1.0)]
    assert any("DeferredLossSync" in r.strategies for r in d.recommendations)
    assert d.strategies == ["DeferredLossSync(every=1)"]  # the doctor's own probe is not listed
    # the given model was trained in place, and every hook the doctor put on it is gone
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks, m


def test_only_the_per_sync_cuda_warning_counts():
    assert is_sync_warning(UserWarning("called a synchronizing CUDA operation (Triggered internally at c10/cuda/CUDAFunctions.cpp:151.)"))
    notice = "Synchronization debug mode is a prototype feature and does not yet detect all synchronizing operations"
    assert not is_sync_warning(UserWarning(notice))


class DropoutHeavy(nn.Module):
    """A tiny seq2seq model whose step is mostly dropout on a wide hidden layer."""

    def __init__(self, vocab: int = 23, d: int = 16, wide: int = 2048) -> None:
        super().__init__()
        self.vocab_size = vocab
        self.emb = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, wide)
        self.drop = nn.Dropout(0.1)
        self.down = nn.Linear(wide, vocab)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        x = self.emb(tgt_in) + self.emb(src).mean(1, keepdim=True)
        return self.down(self.drop(self.up(x)))


@pytest.mark.skipif(not torch_draws_dropout_serially(), reason="this torch draws CPU dropout masks in parallel (MKL)")
def test_dropout_masks_found_and_fast_dropout_recommended(one_thread):
    torch.manual_seed(0)
    d = diagnose(DropoutHeavy(), ragged_pairs(n=32), steps=2, batch_size=16, warmup=1)
    rec = next((r for r in d.recommendations if r.strategies == ["FastDropout"]), None)
    assert rec is not None, [r.text for r in d.recommendations]
    assert "aten::bernoulli_" in rec.text
    # with FastDropout bernoulli_'s own time is gone (its draws show as aten::random_), and it is not suggested again
    torch.manual_seed(0)
    fast = diagnose(DropoutHeavy(), ragged_pairs(n=32), strategies=[FastDropout()], steps=2, batch_size=16, warmup=1)
    assert not any("FastDropout" in r.strategies for r in fast.recommendations)
    own = {o.name: o.host_s for o in fast.top_ops}
    before = {o.name: o.host_s for o in d.top_ops}
    assert own.get("aten::bernoulli_", 0.0) < 0.5 * before["aten::bernoulli_"]
    assert "aten::random_" in own


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"steps": 0}, "steps=0"),
        ({"steps": 2.5}, "steps=2.5"),
        ({"warmup": -1}, "warmup=-1"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"optimizer": "opt"}, "copy_model=False"),
    ],
)
def test_bad_arguments_are_named(kwargs, words):
    with pytest.raises(DoctorError, match=words.replace("(", r"\(").replace(".", r"\.")):
        diagnose(TinySeq2Seq(), ragged_pairs(n=8), **kwargs)
    with pytest.raises(DoctorError, match="torch.nn.Module"):
        diagnose("not a model", ragged_pairs(n=8))


FACTORY = textwrap.dedent(
    """
    import torch
    from conftest import TinySeq2Seq, ragged_pairs

    def factory():
        torch.manual_seed(0)
        return TinySeq2Seq(), ragged_pairs(n=24)

    def not_a_model():
        return 42
    """
)


def test_cli_on_a_factory(tmp_path, monkeypatch, capsys, one_thread):
    (tmp_path / "doctor_factory_mod.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "d.json"
    assert main(["--model", "doctor_factory_mod:factory", "--steps", "2", "--warmup", "0", "--batch-size", "4", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "TinySeq2Seq on cpu; 2 steps of 1 x 4 samples" in text and "Recommendations" in text
    saved = json.loads(out.read_text())
    assert saved["model"] == "TinySeq2Seq" and saved["batch_size"] == 4 and saved["steps"] == 2


def test_cli_refuses_an_unwritable_json_path_before_training(tmp_path, monkeypatch, capsys):
    (tmp_path / "file.txt").write_text("a file, not a folder")

    def no_training(*args, **kwargs):
        raise AssertionError("diagnose ran although --json cannot be written")

    monkeypatch.setattr(doctor, "diagnose", no_training)
    assert main(["--steps", "1", "--json", str(tmp_path / "file.txt" / "out.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hlbd-fast doctor: error: ") and "--json" in err and "file.txt" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "spec, words",
    [
        ("no_colon_here", "must be 'module:factory'"),
        ("no_such_module_xyz:factory", "cannot import 'no_such_module_xyz'"),
        ("doctor_factory_mod:missing", "has no callable 'missing'"),
        ("doctor_factory_mod:not_a_model", "returned int"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, spec, words):
    (tmp_path / "doctor_factory_mod.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["--model", spec, "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hlbd-fast doctor: error: --model") and words in err
    assert len(err.splitlines()) == 1


class ItemModel(TinySeq2Seq):
    """TinySeq2Seq with one value read back inside forward: a graph break under torch.compile."""

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + 0.0 * src.float().mean().item()
        return super().forward(src, tgt_in) * scale


@pytest.mark.filterwarnings("ignore:Compile. torch.compile split:RuntimeWarning")
def test_compile_graph_breaks_reported(one_thread):
    from hlbd_fast.strategies.compile import Compile

    torch.manual_seed(0)
    d = diagnose(ItemModel(), ragged_pairs(n=24), strategies=[Compile(backend="eager")], steps=2, batch_size=8, warmup=1)
    assert d.graph_breaks is not None and d.graph_breaks >= 1
    assert any(".item()" in reason and "test_doctor.py" in reason for reason, _ in d.graph_break_reasons)
    assert d.top_modules == [] and d.syncs_per_step is None  # compiled: no per-module view, no CPU sync count
    assert any("graph" in r.text and "Compile" in r.strategies for r in d.recommendations)
    assert "torch.compile graph breaks:" in str(d)


# ---------------------------------------------------------------------------- a captured step (CUDAGraphStep)
DOCTOR_DIR = os.path.dirname(os.path.abspath(doctor.__file__))  # the doctor is a package: any of its files
#: what must never run from the doctor's code inside a step being captured: a timestamp or a device sync
CLOCKS_AND_SYNCS = {"perf_counter", "synchronize", "_cuda_synchronize"}


class WatchingBackend(StandInBackend):
    """The CUDA stand-in, watching each capture from outside.

    While a step is captured, a profile function (``sys.setprofile``) records every function
    of ``hlbd_fast.doctor`` entered and every timestamp or sync its code asks for: on CUDA a
    sync there makes the capture fail, and a timestamp means nothing.
    """

    def __init__(self) -> None:
        super().__init__(watch=self._watch)
        self.doctor_calls: Counter = Counter()  # doctor functions entered while capturing
        self.doctor_clock: list[str] = []  # timestamps / syncs asked for by doctor code while capturing

    def _watch(self, frame, event, arg) -> None:
        if event == "call" and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == DOCTOR_DIR:
            self.doctor_calls[frame.f_code.co_name] += 1
        caller = frame if event == "c_call" else frame.f_back
        name = getattr(arg, "__name__", "") if event == "c_call" else frame.f_code.co_name
        if event in ("call", "c_call") and caller is not None and name in CLOCKS_AND_SYNCS:
            if os.path.dirname(os.path.abspath(caller.f_code.co_filename)) == DOCTOR_DIR:
                self.doctor_clock.append(f"{name} from {caller.f_code.co_name}")


class HandOver(Strategy):
    """Gives the backend the trainer diagnose builds (the stand-in's capture snapshots its tensors)."""

    def __init__(self, backend: WatchingBackend) -> None:
        self.backend = backend

    def setup(self, trainer) -> None:
        self.backend.trainer = trainer


BUCKETS = (4, 8, 12)
#: row length of each micro-batch of 4, in order: bucket 4, 8 or 12; then a partial batch of 2 rows
BATCH_LENGTHS = (3, 3, 7, 11, 7, 11, 7, 11, 7, 11)


def ordered_loader() -> DataLoader:
    """Batches of 4 in a fixed order (no shuffling) whose step shapes first come late.

    Shapes: bucket 4 (batches 1-2), 8 (batch 3 on), 12 (batch 4 on), and the partial last
    batch (2 rows, bucket 8), seen once per epoch. Batch 3's shape is seen a second time,
    and so captured, only when the doctor's passes have restarted the epoch three times.
    """
    lengths = [n for n in BATCH_LENGTHS for _ in range(4)] + [7, 7]
    g = torch.Generator().manual_seed(0)
    src = torch.zeros(len(lengths), 16, dtype=torch.long)
    tgt = torch.zeros(len(lengths), 16, dtype=torch.long)
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randint(4, 23, (n,), generator=g)
        tgt[i, 0] = 2
        tgt[i, 1:n] = torch.randint(4, 23, (n - 1,), generator=g)
    return DataLoader(TensorDataset(src, tgt), batch_size=4, shuffle=False)


def test_a_captured_step_runs_none_of_the_doctor_and_every_shape_is_warm(one_thread):
    """Buckets make several step shapes (and the epoch's last, partial step one more), some first seen late.

    The doctor puts no forward hook inside a replaced step and takes no timestamp or sync
    in it; its only code there is the loop's own ``before_clip`` hook, which does nothing
    for a replaced step. Every shape is captured in the warm-up epochs, before timing.
    """
    backend = WatchingBackend()
    step = CUDAGraphStep(warmup_steps=1, backend=backend)
    strategies = [DevicePreload(), TrimPadding(buckets=BUCKETS), DeferredLossSync(), step, HandOver(backend)]
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        d = diagnose(TinySeq2Seq(), ordered_loader(), strategies=strategies, steps=3, batch_size=4, warmup=1)
    assert [str(w.message) for w in record if "CUDAGraphStep" in str(w.message)] == []  # no fallback, no re-capture
    assert backend.graphs, "nothing was captured"
    assert backend.doctor_clock == []
    assert set(backend.doctor_calls) <= {"before_clip"}, dict(backend.doctor_calls)
    assert len(backend.graphs) == 4, "three buckets and the partial last step"
    assert d.run_info["CUDAGraphStep"]["fallback"] is None and d.run_info["CUDAGraphStep"]["graphs"] == len(backend.graphs)
    warm = next(n for n in d.notes if "the warm-up ran" in n)
    assert f"({len(backend.graphs)} graphs of {len(backend.graphs)} shapes)" in warm and "not captured" not in warm
    assert sum(g.replays for g in backend.graphs) > 0
    # the step is timed whole: one phase, no per-module view
    assert d.step_s > 0 and d.phases["other"] > 0 and d.phases["forward"] == 0.0
    assert d.top_modules == []
    assert json.loads(json.dumps(d.to_dict()))["run_info"]["CUDAGraphStep"]["graphs"] == len(backend.graphs)


def test_a_graph_step_that_fell_back_is_reported(one_thread):
    """On a CPU the real CUDAGraphStep runs the eager step: the diagnosis says so (notes and run_info)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CUDAGraphStep's own fallback warning
        d = diagnose(TinySeq2Seq(), ragged_pairs(n=24), strategies=[DevicePreload(), DeferredLossSync(), CUDAGraphStep()], steps=2, batch_size=4, warmup=1)
    assert "device is cpu" in d.run_info["CUDAGraphStep"]["fallback"]
    assert any(n.startswith("CUDAGraphStep ran the eager step instead of graphs") for n in d.notes)
    assert not any("the warm-up ran" in n for n in d.notes)  # nothing to capture: no warm-up epochs
    assert "CUDAGraphStep ran the eager step" in str(d)


def test_unpad_recommended_for_a_model_that_runs_padding_free(one_thread):
    """Short rows under a long one leave padding that trimming cannot cut; the reference model can skip it."""
    from hlbd_fast.models import Seq2SeqTransformer

    src, tgt = ragged_pairs(n=64)
    src[::8, :] = torch.randint(4, 23, (8, src.shape[1]))  # one long row in every batch of 8: little to trim
    torch.manual_seed(0)
    model = Seq2SeqTransformer(vocab_size=23, d_model=16, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=32, dropout=0.0, max_length=16)
    d = diagnose(model, (src, tgt), strategies=[DevicePreload(), TrimPadding(multiple_of=1)], steps=2, warmup=1, batch_size=8)
    assert any("Unpad" in r.strategies for r in d.recommendations), [r.text for r in d.recommendations]
    d2 = diagnose(TinySeq2Seq(), (src, tgt), strategies=[DevicePreload(), TrimPadding(multiple_of=1)], steps=2, warmup=1, batch_size=8)
    assert not any("Unpad" in r.strategies for r in d2.recommendations)  # no padding-free forward: not suggested


def test_unpads_own_length_reads_are_a_note_not_a_recommendation(one_thread):
    """Unpad sizes its packed tensors by reading the lengths back: the doctor says so, and does not advise the
    user to keep a value of the library's on the device."""
    from hlbd_fast import Unpad
    from hlbd_fast.models import Seq2SeqTransformer

    src, tgt = ragged_pairs(n=32)
    torch.manual_seed(0)
    model = Seq2SeqTransformer(vocab_size=23, d_model=16, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=32, dropout=0.0, max_length=16)
    d = diagnose(model, (src, tgt), strategies=[Unpad()], steps=2, warmup=1, batch_size=8)
    note = next(n for n in d.notes if n.startswith("Unpad reads each packing's size back"))
    assert "2 per step" in note  # the sources' packing and the targets'
    assert not any("packing.py" in r.text for r in d.recommendations), [r.text for r in d.recommendations]


# ---------------------------------------------------------------------------- the padding: proven, then priced
def _transformer(leaky: bool):
    """A small reference model; ``leaky``: it attends to padded source keys, as the user's APTModel does."""
    from hlbd_fast.models import Seq2SeqTransformer

    class Leaky(Seq2SeqTransformer):
        def source_mask(self, src):
            return torch.ones_like(super().source_mask(src))

    torch.manual_seed(0)
    cls = Leaky if leaky else Seq2SeqTransformer
    return cls(vocab_size=23, d_model=16, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=32, dropout=0.0, max_length=32)


def _much_padding(n: int = 32, extra: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    src, tgt = ragged_pairs(n=n)
    z = torch.zeros(n, extra, dtype=torch.long)
    return torch.cat([src, z], 1), torch.cat([tgt, z], 1)


@pytest.mark.parametrize("preset", [None, "fastest"])
def test_a_padding_leak_is_named_with_its_price_and_no_refused_strategy_is_recommended(preset):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fastest says it leaves TrimPadding and Unpad out
        d = diagnose(_transformer(leaky=True), _much_padding(), steps=2, warmup=1, batch_size=16, preset=preset, device="cpu")
    leak = [r for r in d.recommendations if r.text.startswith("the model lets padding reach real positions")]
    assert len(leak) == 1, [r.text for r in d.recommendations]
    text = leak[0].text
    assert "changed the model's logits" in text and "mask padding keys in attention" in text
    assert "TrimPadding would make a training step" in text and "measured on copies of the model" in text
    assert not any({"TrimPadding", "Unpad"} & set(r.strategies) for r in d.recommendations)
    price = d.padding_price
    assert price["trim_refused"] and price["unpad_refused"] and price["padded_s"] > 0 and price["trimmed_s"] > 0
    assert price["trim_ratio"] == pytest.approx(price["padded_s"] / price["trimmed_s"])


def test_trimming_a_model_that_masks_padding_is_recommended_with_its_measured_price():
    d = diagnose(_transformer(leaky=False), _much_padding(), steps=2, warmup=1, batch_size=16, device="cpu")
    assert d.padding_price["trim_refused"] is None and d.padding_price["unpad_refused"] is None
    trim = next(r for r in d.recommendations if "TrimPadding" in r.strategies)
    assert "measured on a copy of the model: a training step" in trim.text
    assert not any(r.text.startswith("the model lets padding") for r in d.recommendations)


def test_nothing_is_priced_when_the_strategies_cut_the_padding_already():
    d = diagnose(_transformer(leaky=False), _much_padding(), steps=2, warmup=1, batch_size=16, device="cpu", strategies=[TrimPadding(), Unpad()])
    assert d.padding_price == {}


def test_diagnose_leaves_the_callers_random_stream_as_it_was():
    model, data = TinySeq2Seq(), ragged_pairs(n=16)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    diagnose(model, data, steps=1, warmup=0, batch_size=8, device="cpu")
    assert torch.equal(torch.rand(3), expected)
