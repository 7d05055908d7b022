"""FastTrainer's contract: inputs it accepts, the errors it raises, what it reports and saves."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TinySeq2Seq, clone, ragged_pairs
from torch.utils.data import DataLoader, TensorDataset

from hlbd_fast import (
    DeferredLossSync,
    EagerLossSync,
    FastTrainer,
    GradientAccumulation,
    NonFiniteLossError,
    Strategy,
    StrategyConflictError,
)
from hlbd_fast.checkpoint import read_checkpoint
from hlbd_fast.strategies import OptimizerFactory


def make(model=None, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("seed", 0)
    return FastTrainer(model if model is not None else TinySeq2Seq(), **kw)


# ---------------------------------------------------------------- accepted inputs
def test_fit_accepts_tensors_dataset_and_loader(pairs):
    src, tgt = pairs
    for data in [(src, tgt), TensorDataset(src, tgt), DataLoader(TensorDataset(src, tgt), batch_size=8)]:
        h = make().fit(data, epochs=1, batch_size=8)
        assert len(h) == 1 and math.isfinite(h.losses[0])
        assert h[0].micro_batches == 5 and h[0].tokens == int((tgt[:, 1:] != 0).sum())


def test_dataset_and_tensors_give_the_same_run(tiny_model, pairs):
    a, b = clone(tiny_model), clone(tiny_model)
    ha = make(a, seed=4).fit(pairs, 2, batch_size=8)
    hb = make(b, seed=4).fit(TensorDataset(*pairs), 2, batch_size=8)
    assert ha.losses == hb.losses
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("kind", ["dict", "tuple"])
def test_model_outputs_dict_or_tuple(kind, pairs):
    class Wrapped(TinySeq2Seq):
        def forward(self, src, tgt_in):
            logits = super().forward(src, tgt_in)
            return {"logits": logits, "aux": 1} if kind == "dict" else (logits, None)

    h = make(Wrapped()).fit(pairs, 1, batch_size=8)
    assert math.isfinite(h.losses[0])


def test_history_fields_and_json(pairs, tmp_path):
    t = make(strategies=[GradientAccumulation(2)])
    h = t.fit(pairs, 2, batch_size=4)
    r = h[0]
    assert r.epoch == 1 and r.optimizer_steps == 5 and r.micro_batches == 10 and r.skipped_steps == 0
    assert r.seconds > 0 and r.tokens_per_second > 0
    assert h.losses[1] < h.losses[0]
    h.save_json(tmp_path / "h.json")
    d = json.loads((tmp_path / "h.json").read_text())
    assert [e["loss"] for e in d["epochs"]] == h.losses
    assert t.global_step == 10 and t.epoch == 2


def test_fit_counts_epochs_already_done(pairs):
    t = make()
    t.fit(pairs, 2, batch_size=8)
    t.fit(pairs, 3, batch_size=8)  # one more
    assert [r.epoch for r in t.history] == [1, 2, 3]


def test_leftover_micro_batches_make_a_final_smaller_step(pairs):
    h = make(strategies=[GradientAccumulation(3)]).fit(pairs, 1, batch_size=4)  # 10 micro-batches
    assert h[0].optimizer_steps == 4  # 3 + 3 + 3 + 1


def test_drop_in_train_epoch_with_user_optimizer(tiny_model, pairs):
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    t = make(tiny_model, optimizer=opt, strategies=[GradientAccumulation(2)], loss_normalization="micro_batch")
    loader = DataLoader(TensorDataset(*pairs), batch_size=4, shuffle=True)
    losses = [t.train_epoch(loader) for _ in range(3)]
    assert t.optimizer is opt and losses[-1] < losses[0]


def test_progress_bar_runs_without_error(pairs, capsys):
    h = FastTrainer(TinySeq2Seq(), seed=0, progress=True).fit(pairs, 1, batch_size=8)
    assert len(h) == 1


def test_baseline_preset_is_the_seed_loop(pairs):
    t = FastTrainer.from_preset(TinySeq2Seq(), "baseline", progress=False)
    assert t.batch_size == 4 and t.accumulation == 8 and t.loss_normalization == "micro_batch"
    assert isinstance(t.optimizer, torch.optim.Adam) and t.optimizer.param_groups[0]["lr"] == 5e-5
    assert isinstance(t.roles.readback, EagerLossSync)
    h = t.fit(pairs, 1)
    assert h[0].micro_batches == 10 and h[0].optimizer_steps == 2
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        FastTrainer.from_preset(TinySeq2Seq(), "nope")


# ---------------------------------------------------------------- strategies
def test_two_strategies_for_one_role_is_an_error_naming_both():
    with pytest.raises(StrategyConflictError, match=r"GradientAccumulation\(steps=8\).*GradientAccumulation\(steps=2\).*'accumulation'"):
        make(strategies=[GradientAccumulation(8), GradientAccumulation(2)])
    with pytest.raises(StrategyConflictError, match="DeferredLossSync.*EagerLossSync.*'readback'"):
        make(strategies=[DeferredLossSync(), EagerLossSync()])


def test_strategy_class_instead_of_instance_is_explained():
    with pytest.raises(TypeError, match="instead of an instance"):
        make(strategies=[GradientAccumulation])


def test_optimizer_and_optimizer_strategy_conflict(tiny_model):
    class MyOpt(OptimizerFactory):
        def build_optimizer(self, trainer, params):
            return torch.optim.SGD(params, lr=0.1)

    with pytest.raises(StrategyConflictError, match="SGD.*MyOpt"):
        make(tiny_model, optimizer=torch.optim.SGD(tiny_model.parameters(), lr=0.1), strategies=[MyOpt()])
    assert isinstance(make(strategies=[MyOpt()]).optimizer, torch.optim.SGD)


def test_strategy_state_goes_into_checkpoints(pairs, tmp_path):
    class Counter(Strategy):
        def __init__(self):
            self.steps = 0

        def on_step_end(self, trainer):
            self.steps += 1

        def state_dict(self):
            return {"steps": self.steps}

        def load_state_dict(self, state):
            self.steps = state["steps"]

    t = make(strategies=[Counter()])
    t.fit(pairs, 1, batch_size=8)
    t.save(tmp_path / "c.pt")
    t2 = make(strategies=[Counter()])
    t2.load(tmp_path / "c.pt")
    assert t2.strategies[0].steps == 5 and t2.epoch == 1 and t2.global_step == 5
    with pytest.raises(ValueError, match="holds the state of strategy Counter"):
        make().load(tmp_path / "c.pt")


@pytest.mark.parametrize("arg", [0, -1, 2.0, True])
def test_bad_accumulation_steps(arg):
    with pytest.raises(ValueError, match="GradientAccumulation"):
        GradientAccumulation(arg)


@pytest.mark.parametrize("arg", [0, 1.5])
def test_bad_deferred_every(arg):
    with pytest.raises(ValueError, match="every"):
        DeferredLossSync(every=arg)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "src,tgt,error,match",
    [
        (torch.zeros(4, 5), torch.ones(4, 6, dtype=torch.long), TypeError, "src has dtype torch.float32"),
        (torch.ones(4, 5, dtype=torch.long), torch.ones(3, 6, dtype=torch.long), ValueError, "src has 4 rows but tgt has 3"),
        (torch.ones(4, 5, 2, dtype=torch.long), torch.ones(4, 6, dtype=torch.long), ValueError, "expected 2-D"),
        (torch.ones(4, 5, dtype=torch.long), torch.ones(4, 1, dtype=torch.long), ValueError, "at least 2 tokens"),
        (torch.full((4, 5), -1), torch.ones(4, 6, dtype=torch.long), ValueError, "token id -1"),
        (torch.full((4, 5), 23), torch.ones(4, 6, dtype=torch.long), ValueError, "token id 23 but the model's vocabulary has 23"),
        # integer ids of other widths fail inside torch (cross_entropy wants int64 targets): named here instead
        (torch.ones(4, 5, dtype=torch.int8), torch.ones(4, 6, dtype=torch.long), TypeError, r"src has dtype torch.int8.*src.long\(\)"),
        (torch.ones(4, 5, dtype=torch.uint8), torch.ones(4, 6, dtype=torch.long), TypeError, "src has dtype torch.uint8"),
        (torch.ones(4, 5, dtype=torch.long), torch.ones(4, 6, dtype=torch.int16), TypeError, "tgt has dtype torch.int16"),
        (torch.ones(4, 5, dtype=torch.long), torch.ones(4, 6, dtype=torch.int32), TypeError, r"tgt has dtype torch.int32.*tgt.long\(\)"),
    ],
)
def test_bad_tensors_are_named(src, tgt, error, match):
    with pytest.raises(error, match=match):
        make().fit((src, tgt), 1)


def test_out_of_vocab_ids_in_a_loader_are_caught_before_forward():
    src = torch.ones(8, 5, dtype=torch.long)
    tgt = torch.ones(8, 6, dtype=torch.long)
    tgt[5, 2] = 99
    loader = DataLoader(TensorDataset(src, tgt), batch_size=4)
    with pytest.raises(ValueError, match="token id 99"):
        make().fit(loader, 1)


@pytest.mark.parametrize("kw,match", [({"epochs": 0}, "epochs=0"), ({"epochs": 1, "batch_size": 0}, "batch_size=0")])
def test_bad_fit_arguments(pairs, kw, match):
    with pytest.raises(ValueError, match=match):
        make().fit(pairs, **kw)


def test_empty_data():
    with pytest.raises(ValueError, match="empty"):
        make().fit((torch.ones(0, 5, dtype=torch.long), torch.ones(0, 6, dtype=torch.long)), 1)
    with pytest.raises(TypeError, match="must be a \\(src, tgt\\) pair"):
        make().fit([1, 2, 3], 1)


class DictPairs(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"src": torch.ones(5, dtype=torch.long), "tgt": torch.ones(6, dtype=torch.long)}


def test_dict_batches_without_a_forward_loss_for_them_are_explained():
    with pytest.raises(TypeError, match=r"a dict with keys \['src', 'tgt'\].*override forward_logits and count_tokens"):
        make().fit(DictPairs(), 1, batch_size=2)


def test_logits_narrower_than_the_vocabulary_are_named(pairs):
    class Narrow(TinySeq2Seq):
        def forward(self, src, tgt_in):
            return super().forward(src, tgt_in)[..., :10]

    with pytest.raises(ValueError, match="logits over 10 ids but its vocabulary has 23"):
        make(Narrow()).fit(pairs, 1, batch_size=8)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"lr": True}, "lr=True"),
        ({"lr": float("inf")}, "lr=inf.*finite"),
        ({"lr": float("nan")}, "lr=nan"),
        ({"lr": "1e-3"}, "lr='1e-3'"),
        ({"max_grad_norm": "1"}, "max_grad_norm='1'"),
        ({"max_grad_norm": float("nan")}, "max_grad_norm=nan"),
        ({"pad_id": 23}, "pad_id=23 is outside the model's vocabulary of 23"),
        ({"pad_id": -1}, "pad_id=-1"),
        ({"pad_id": 1.0}, "pad_id=1.0"),
        ({"progress": "yes"}, "progress='yes'"),
        ({"seed": 1.5}, "seed=1.5"),
        ({"strategies": GradientAccumulation(2)}, "list of Strategy instances"),
    ],
)
def test_bad_values_are_refused_naming_the_argument(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make(**kw)


def test_strategies_none_means_none(pairs):
    t = make(strategies=None)
    assert t.strategies == () and math.isfinite(t.fit(pairs, 1, batch_size=8).losses[0])


def test_the_same_strategy_instance_twice_is_refused():
    s = GradientAccumulation(2)
    with pytest.raises(ValueError, match="listed twice"):
        make(strategies=[s, s])


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="loss_normalization='mean'"):
        make(loss_normalization="mean")
    with pytest.raises(ValueError, match="lr=0"):
        make(lr=0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        make(max_grad_norm=-1)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        FastTrainer(lambda s, t: s)
    m = TinySeq2Seq()
    with pytest.raises(ValueError, match="does not hold this model's parameters"):
        make(m, optimizer=torch.optim.SGD(TinySeq2Seq().parameters(), lr=0.1))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            make(device="cuda")


def test_all_padding_micro_batch_counts_and_contributes_nothing(tiny_model):
    src, tgt = ragged_pairs(n=8)
    tgt[4:, 1:] = 0  # the second micro-batch of 4 has only padding targets
    for norm in ("tokens", "micro_batch"):
        a, b = clone(tiny_model), clone(tiny_model)
        h = make(a, strategies=[GradientAccumulation(2)], loss_normalization=norm).fit((src, tgt), 1, 4, shuffle=False)
        assert h[0].empty_micro_batches == 1 and math.isfinite(h[0].loss)
        assert all(torch.isfinite(p).all() for p in a.parameters())
        # only the first micro-batch counts: the same step as training on it alone
        make(b, loss_normalization=norm, strategies=[GradientAccumulation(2)]).fit((src[:4], tgt[:4]), 1, 4, shuffle=False)
        if norm == "tokens":
            assert all(torch.allclose(p, q, atol=1e-7) for p, q in zip(a.parameters(), b.parameters()))


def test_model_returning_wrong_shape_is_named(pairs):
    class Transposed(TinySeq2Seq):
        def forward(self, src, tgt_in):
            return super().forward(src, tgt_in).transpose(0, 1)

    class NoLogits(TinySeq2Seq):
        def forward(self, src, tgt_in):
            return {"hidden": super().forward(src, tgt_in)}

    with pytest.raises(ValueError, match=r"returned shape \(11, 8, 23\); expected logits \[B, T, V\] = \[8, 11, vocab\]"):
        make(Transposed()).fit(pairs, 1, batch_size=8, shuffle=False)
    with pytest.raises(ValueError, match="without 'logits'"):
        make(NoLogits()).fit(pairs, 1, batch_size=8)


class Explode(Strategy):
    """Makes the loss NaN from optimizer step ``at`` on by poisoning a weight."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, trainer):
        if trainer.global_step == self.at:
            with torch.no_grad():
                trainer.model.out.bias.fill_(float("nan"))


@pytest.mark.parametrize("sync", [None, DeferredLossSync(), EagerLossSync()])
def test_nan_loss_stops_naming_epoch_and_step_and_keeps_checkpoint(pairs, tmp_path, sync):
    strategies = [Explode(at=7)] + ([sync] if sync else [])
    t = make(strategies=strategies)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, optimizer step 8.*last checkpoint .*last.pt is untouched") as e:
        t.fit(pairs, 3, batch_size=8, checkpoint_dir=tmp_path)
    assert e.value.epoch == 2 and e.value.step == 8
    state = read_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_failed_save_leaves_previous_checkpoint_intact(pairs, tmp_path, monkeypatch):
    t = make()
    t.fit(pairs, 1, batch_size=8, checkpoint_dir=tmp_path)
    before = (tmp_path / "last.pt").read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        t.fit(pairs, 2, batch_size=8, checkpoint_dir=tmp_path)
    assert (tmp_path / "last.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make().load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        make().load(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        make().fit(ragged_pairs(), 1, resume=True)


def test_custom_batch_format_by_subclassing(tiny_model, tmp_path):
    """A model taking a dict batch: override forward_logits and count_tokens; it trains, evaluates and keeps its best."""
    src, tgt = ragged_pairs(n=16)
    data = [{"src": src[i], "tgt": tgt[i]} for i in range(16)]
    calls = []

    class DictTrainer(FastTrainer):
        def forward_logits(self, model, batch):
            calls.append(model is self.model)
            tgt = batch["tgt"]
            return model(batch["src"], tgt[:, :-1]), tgt[:, 1:]

        def count_tokens(self, batch):
            return (batch["tgt"][:, 1:] != self.pad_id).sum()

    class ListDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return data[i]

    a, b = clone(tiny_model), clone(tiny_model)
    ta, tb = DictTrainer(a, seed=2, progress=False), FastTrainer(b, seed=2, progress=False)
    ha = ta.fit(ListDataset(), 2, batch_size=4, eval_data=ListDataset(), keep_best="eval_loss", checkpoint_dir=tmp_path)
    hb = tb.fit((src, tgt), 2, batch_size=4, eval_data=(src, tgt))
    assert ha.losses == pytest.approx(hb.losses, rel=1e-6)
    assert [r.eval["loss"] for r in ha] == pytest.approx([r.eval["loss"] for r in hb], rel=1e-6)
    assert ta.evaluate(ListDataset()) == pytest.approx(tb.evaluate((src, tgt)), rel=1e-6)
    assert calls and all(calls)  # no strategy wraps the model here: training and evaluation call it as it is
    assert ha.best.metric == "eval_loss" and (tmp_path / "best.pt").is_file()


def test_overriding_forward_loss_points_to_forward_logits(tiny_model):
    class Old(FastTrainer):
        def forward_loss(self, batch):
            return super().forward_loss(batch)

    with pytest.raises(TypeError, match=r"Old overrides forward_loss; override forward_logits\(self, model, batch\)"):
        Old(tiny_model, progress=False)


def test_load_weights_for_inference(pairs, tmp_path):
    from hlbd_fast import load_weights
    from hlbd_fast.models import Seq2SeqTransformer

    model = Seq2SeqTransformer(vocab_size=23, d_model=16, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=32)
    make(model).fit(pairs, 1, batch_size=8, checkpoint_dir=tmp_path)
    fresh = Seq2SeqTransformer(vocab_size=23, d_model=16, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=32)
    rng = torch.get_rng_state()
    config = load_weights(fresh, tmp_path / "last.pt")
    assert config["d_model"] == 16 and config["vocab_size"] == 23
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))
    assert torch.equal(rng, torch.get_rng_state())  # no RNG state touched
    with pytest.raises(FileNotFoundError):
        load_weights(fresh, tmp_path / "nope.pt")


def test_seed_none_follows_torch_manual_seed_without_drawing():
    torch.manual_seed(42)
    a = FastTrainer(TinySeq2Seq(), progress=False)
    after_a = torch.get_rng_state()
    torch.manual_seed(42)
    TinySeq2Seq()
    assert torch.equal(after_a, torch.get_rng_state())  # building the trainer drew nothing
    torch.manual_seed(42)
    b = FastTrainer(TinySeq2Seq(), progress=False)
    assert a.seed == b.seed
