"""Checkpoint guards: another model configuration or class, another scheduler class, directories where files belong.

Each refusal names the difference and the fix, and leaves the trainer (or the model) as it was.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from conftest import TinySeq2Seq, ragged_pairs

from hlbd_fast import CheckpointError, FastTrainer, load_weights
from hlbd_fast._io import check_checkpoint_files
from hlbd_fast.checkpoint import read_checkpoint, write_checkpoint
from hlbd_fast.models import Seq2SeqTransformer
from hlbd_fast.schedules import warmup_cosine

TINY = dict(vocab_size=50, d_model=32, n_heads=2, d_ff=64, n_encoder_layers=1, n_decoder_layers=1, dropout=0.0)


def tiny(cls=Seq2SeqTransformer, **overrides) -> Seq2SeqTransformer:
    torch.manual_seed(1)
    return cls(**{**TINY, **overrides})


class Renamed(Seq2SeqTransformer):
    """Another model class with the same configuration and the same state_dict keys."""


def data():
    return ragged_pairs(n=8, vocab=50)


def make(model, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("seed", 0)
    kw.setdefault("lr", 1e-3)
    return FastTrainer(model, **kw)


def weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(t: FastTrainer) -> dict:
    return {
        "model": weights(t.model),
        "optimizer": repr(t.optimizer.state_dict()),
        "scheduler": repr(t.scheduler.state_dict()) if t.scheduler is not None else None,
        "counters": (t.epoch, t.global_step, t.seed, t.lr, len(t.history)),
        "rng": torch.get_rng_state().clone(),
    }


def same(a: dict, b: dict) -> bool:
    return (
        same_weights(a["model"], b["model"])
        and (a["optimizer"], a["scheduler"], a["counters"]) == (b["optimizer"], b["scheduler"], b["counters"])
        and torch.equal(a["rng"], b["rng"])
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Seq2SeqTransformer (n_heads=2, pad_id=0) trained two steps, its checkpoint in ``<dir>/last.pt``."""
    directory = tmp_path_factory.mktemp("trained")
    make(tiny()).fit(data(), 1, batch_size=4, checkpoint_dir=directory)
    return directory / "last.pt"


# ---------------------------------------------------------------------------- 1. model configuration and class
def test_the_checkpoint_stores_the_model_class_and_config(trained):
    state = read_checkpoint(trained)
    assert state["model_class"] == "Seq2SeqTransformer"
    assert state["model_config"]["n_heads"] == 2 and state["model_config"]["pad_id"] == 0


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: tiny(n_heads=4), r"n_heads: checkpoint 2, model 4"),
        (lambda: tiny(pad_id=1), r"pad_id: checkpoint 0, model 1"),
        (lambda: tiny(Renamed), r"model class: checkpoint Seq2SeqTransformer, model Renamed"),
        (
            lambda: tiny(Renamed, n_heads=4, pad_id=1),
            r"model class: checkpoint Seq2SeqTransformer, model Renamed; n_heads: checkpoint 2, model 4; pad_id: checkpoint 0, model 1",
        ),
    ],
)
def test_load_weights_refuses_another_configuration_with_the_same_shapes(trained, build, match):
    model = build()
    before = weights(model)
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in tiny().state_dict().items()}
    with pytest.raises(CheckpointError, match=match) as e:
        load_weights(model, trained)
    assert str(trained) in str(e.value) and "Build the model as it was saved" in str(e.value)
    assert same_weights(before, weights(model))  # nothing loaded


@pytest.mark.parametrize("overrides", [dict(n_heads=4), dict(pad_id=1)])
def test_trainer_load_refuses_another_configuration_and_changes_nothing(trained, overrides):
    t = make(tiny(**overrides))
    before = snapshot(t)
    key, value = next(iter(overrides.items()))
    with pytest.raises(CheckpointError, match=f"{key}: checkpoint {read_checkpoint(trained)['model_config'][key]}, model {value}"):
        t.load(trained)
    assert same(before, snapshot(t))


def test_resume_refuses_another_configuration_before_training(trained, tmp_path):
    """fit(resume=True) with an n_heads=4 model on an n_heads=2 checkpoint: refused before any step."""
    (tmp_path / "last.pt").write_bytes(trained.read_bytes())  # its own copy: a resume writes last.pt
    t = make(tiny(n_heads=4))
    before = snapshot(t)
    with pytest.raises(CheckpointError, match="n_heads: checkpoint 2, model 4"):
        t.fit(data(), 2, batch_size=4, checkpoint_dir=tmp_path, resume=True)
    assert same(before, snapshot(t))
    assert (tmp_path / "last.pt").read_bytes() == trained.read_bytes()  # the checkpoint is untouched


def test_a_checkpoint_from_another_configuration_refused_in_memory_too(trained):
    saved = make(tiny(pad_id=1))
    saved_state = saved.state_dict()
    t = make(tiny())
    before = snapshot(t)
    with pytest.raises(CheckpointError, match="the state was saved from a model built otherwise.*pad_id: checkpoint 1, model 0"):
        t.load_state_dict(saved_state)
    assert same(before, snapshot(t))


def test_the_same_configuration_loads_without_a_word(trained):
    model = tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = load_weights(model, trained)
        make(tiny()).load(trained)
    assert config["n_heads"] == 2
    assert same_weights(weights(model), read_checkpoint(trained)["model"])


def test_another_dropout_is_said_not_refused(trained):
    """Dropout changes training, not what the weights compute: loaded, with a warning naming it."""
    model = tiny(dropout=0.2)
    with pytest.warns(UserWarning, match=r"dropout: checkpoint 0.0, model 0.2.*keeps its own"):
        load_weights(model, trained)
    assert same_weights(weights(model), read_checkpoint(trained)["model"])
    t = make(tiny(dropout=0.2))
    with pytest.warns(UserWarning, match=r"dropout: checkpoint 0.0, model 0.2"):
        t.load(trained)
    assert t.epoch == 1 and t.model.config.dropout == 0.2


def test_checkpoints_without_a_stored_config_or_class_still_load(trained, tmp_path):
    state = read_checkpoint(trained)
    del state["model_config"], state["model_class"]
    old = tmp_path / "old.pt"
    write_checkpoint(state, old)
    model = tiny()
    assert load_weights(model, old) is None
    assert same_weights(weights(model), state["model"])
    t = make(tiny())
    t.load(old)
    assert t.epoch == 1
    torch.save(state, tmp_path / "v1.pt")  # the 0.1 layout: the state itself, no envelope
    make(tiny()).load(tmp_path / "v1.pt")


def test_a_model_without_a_config_is_compared_by_its_weights_only(tmp_path):
    """A plain nn.Module: another class with the same weights still loads (nothing changed there)."""

    class Subclass(TinySeq2Seq):
        pass

    t = make(TinySeq2Seq())
    t.fit(ragged_pairs(n=8), 1, batch_size=4)
    t.save(tmp_path / "plain.pt")
    assert read_checkpoint(tmp_path / "plain.pt")["model_config"] is None
    model = Subclass()
    load_weights(model, tmp_path / "plain.pt")
    assert same_weights(weights(model), weights(t.model))
    make(Subclass()).load(tmp_path / "plain.pt")


# ---------------------------------------------------------------------------- 2. a directory given as the checkpoint
def test_load_weights_on_a_directory_names_the_files_to_pass(trained, tmp_path):
    directory = trained.parent
    with pytest.raises(IsADirectoryError, match="is a directory") as e:
        load_weights(tiny(), directory)
    message = str(e.value)
    assert f"{directory / 'best.pt'} or {directory / 'last.pt'}" in message
    assert "it holds last.pt" in message and "best.pt and" not in message
    with pytest.raises(IsADirectoryError, match="it holds neither: fit\\(checkpoint_dir="):
        load_weights(tiny(), tmp_path)
    (tmp_path / "epoch3.pt").write_bytes(b"")
    with pytest.raises(IsADirectoryError, match="it holds neither, but epoch3.pt"):
        make(tiny()).load(tmp_path)  # the trainer's load says the same


def test_load_weights_on_a_directory_lists_both_when_both_are_there(tmp_path):
    make(tiny()).fit(data(), 2, batch_size=4, eval_data=data(), keep_best="eval_loss", checkpoint_dir=tmp_path)
    with pytest.raises(IsADirectoryError, match="it holds best.pt and last.pt"):
        load_weights(tiny(), tmp_path)
    load_weights(tiny(), tmp_path / "best.pt")  # what the message says to pass


# ---------------------------------------------------------------------------- 3. best.pt / last.pt being directories
@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_check_checkpoint_files_refuses_a_directory_in_a_file_s_place(tmp_path, name):
    (tmp_path / name).mkdir()
    with pytest.raises(ValueError, match=rf"checkpoint_dir '{tmp_path}' holds '{tmp_path / name}', which is a directory") as e:
        check_checkpoint_files(tmp_path, ["last.pt", "best.pt"])
    assert "Move or remove it, or choose another checkpoint_dir" in str(e.value)


def test_check_checkpoint_files_lets_files_links_and_absent_names_pass(tmp_path):
    assert check_checkpoint_files(tmp_path, ["last.pt", "best.pt"]) == tmp_path  # none there yet
    (tmp_path / "real.pt").write_bytes(b"x")
    (tmp_path / "last.pt").symlink_to(tmp_path / "real.pt")
    (tmp_path / "best.pt").write_bytes(b"x")
    check_checkpoint_files(tmp_path, ["last.pt", "best.pt"])
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="a directory \\(through a symbolic link\\)"):
        check_checkpoint_files(tmp_path, ["linked"], what="out_dir")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_check_checkpoint_files_refuses_other_kinds_of_file(tmp_path):
    os.mkfifo(tmp_path / "last.pt")
    with pytest.raises(ValueError, match="not a regular file"):
        check_checkpoint_files(tmp_path, ["last.pt"])


def test_saving_over_a_directory_is_refused_before_writing(tmp_path):
    (tmp_path / "c.pt").mkdir()
    t = make(tiny())
    with pytest.raises(IsADirectoryError, match=f"cannot write '{tmp_path / 'c.pt'}': it is a directory"):
        t.save(tmp_path / "c.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"] and not any((tmp_path / "c.pt").iterdir())


# ---------------------------------------------------------------------------- 4. scheduler class
def step_lr(opt):
    return torch.optim.lr_scheduler.StepLR(opt, 2)


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory):
    """A trainer with warmup_cosine (a LambdaLR), trained two steps, saved to ``<dir>/last.pt``."""
    directory = tmp_path_factory.mktemp("scheduled")
    make(tiny(), scheduler=warmup_cosine(1, 10)).fit(data(), 1, batch_size=4, checkpoint_dir=directory)
    return directory / "last.pt"


def test_a_scheduler_of_another_class_is_refused_naming_both(scheduled, tmp_path):
    assert read_checkpoint(scheduled)["scheduler_class"] == "LambdaLR"
    t = make(tiny(), scheduler=step_lr)
    before = snapshot(t)
    with pytest.raises(CheckpointError, match="trained with scheduler LambdaLR; this trainer uses StepLR.*same scheduler="):
        t.load(scheduled)
    assert same(before, snapshot(t))
    (tmp_path / "last.pt").write_bytes(scheduled.read_bytes())  # its own copy: a resume writes last.pt
    with pytest.raises(CheckpointError, match="scheduler LambdaLR; this trainer uses StepLR"):
        t.fit(data(), 2, batch_size=4, checkpoint_dir=tmp_path, resume=True)
    assert same(before, snapshot(t))
    assert (tmp_path / "last.pt").read_bytes() == scheduled.read_bytes()


def test_the_other_way_round_too(tmp_path):
    make(tiny(), scheduler=step_lr).fit(data(), 1, batch_size=4, checkpoint_dir=tmp_path)
    t = make(tiny(), scheduler=warmup_cosine(1, 10))
    before = snapshot(t)
    with pytest.raises(CheckpointError, match="scheduler StepLR; this trainer uses LambdaLR"):
        t.load(tmp_path / "last.pt")
    assert same(before, snapshot(t))


def test_the_same_scheduler_class_loads_and_old_checkpoints_without_it_too(scheduled, tmp_path):
    t = make(tiny(), scheduler=warmup_cosine(1, 10))
    t.load(scheduled)
    assert t.scheduler.last_epoch == read_checkpoint(scheduled)["scheduler"]["last_epoch"] == 2
    state = read_checkpoint(scheduled)
    del state["scheduler_class"]
    write_checkpoint(state, tmp_path / "old.pt")
    other = make(tiny(), scheduler=warmup_cosine(1, 10))
    other.load(tmp_path / "old.pt")
    assert other.scheduler.last_epoch == 2
