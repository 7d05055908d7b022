"""The bundled examples run with tiny settings and do what they print; the custom strategies compute what they claim."""

from __future__ import annotations

import copy
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hlbd_fast import GradientAccumulation, Strategy
from hlbd_fast.data import CharTokenizer, load_hlbd

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> dict:
    """The example's module namespace (its ``main`` is not run)."""
    return runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name=f"example_{name}")


# ---------------------------------------------------------------------------- hlbd_quick_learning.py
def test_quick_learning_runs_as_a_script_then_resumes(tmp_path, capsys):
    ckpt = tmp_path / "ck"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "hlbd_quick_learning.py"), "--epochs", "2", "--tiny", "--checkpoint-dir", str(ckpt), "--no-progress"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "data: 48 of 600 pairs" in out and "vocabulary 5000" in out
    assert "preset 'fastest' on cpu: batch 32 x accumulation 1" in out
    assert len(re.findall(r"^\s+\d+\s+\d+\.\d{4}\s", out, flags=re.M)) == 2  # the history table: 2 epochs
    for prompt in ("🌧️", "❤️", "I love you", "愛してる", "사랑해"):
        assert f"  {prompt} -> " in out
    # 48 pairs / batch 32 = 2 steps per epoch; the reloaded model is the trained one
    assert "reloaded: epoch 2, step 4, same weights: True, same answers: True" in out
    assert {p.name for p in ckpt.iterdir()} >= {"last.pt", "tokenizer.json", "model_config.json"}

    # --resume continues from last.pt: one more epoch to reach 3
    main = load_example("hlbd_quick_learning")["main"]
    assert main(["--epochs", "3", "--tiny", "--checkpoint-dir", str(ckpt), "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^\s+\d+\s+\d+\.\d{4}\s", out, flags=re.M)) == 3  # history restored + the new epoch
    assert "reloaded: epoch 3, step 6, same weights: True, same answers: True" in out


# ---------------------------------------------------------------------------- drop_in_train_epoch.py
def test_drop_in_equals_the_original_epoch_function(capsys):
    main = load_example("drop_in_train_epoch")["main"]
    assert main(["--epochs", "2", "--tiny", "--compare"]) == 0
    out = capsys.readouterr().out
    ours = [float(x) for x in re.findall(r"^Epoch \d+/2, Loss: (\S+)$", out, flags=re.M)]
    theirs = [float(x) for x in re.search(r"original train_epoch losses: (.*)$", out, flags=re.M).group(1).split(", ")]
    assert len(ours) == 2 and ours == theirs  # same to the 4 printed decimals
    assert "largest weight difference: 0;" in out  # bit for bit


# ---------------------------------------------------------------------------- custom_strategy.py
def test_custom_strategy_script(capsys):
    main = load_example("custom_strategy")["main"]
    assert main(["--epochs", "2", "--tiny", "--log-every", "1", "--warmup", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (
        "roles: {'distribution': 'Distribution', 'precision': 'Precision', 'optimizer': 'OptimizerFactory', "
        "'accumulation': 'GradientAccumulation', 'batches': 'BatchSource', 'forward': 'Forward', 'step': 'StepRunner', "
        "'readback': 'DeferredLossSync'}"
    ) in out
    # 48 pairs / 16 = 3 micro-batches = 2 steps per epoch; a norm for each of the 4 steps
    assert [int(s) for s in re.findall(r"^\s+step\s+(\d+): \d+\.\d+$", out, flags=re.M)] == [1, 2, 3, 4]
    assert "lr now: 0.001 (target 0.001, warm-up 3 steps)" in out
    assert "strategies DeferredLossSync(every=None) and ReadLossEveryStep() both fill the role 'readback'" in out


@pytest.fixture(scope="module")
def custom():
    """The example's classes, and a small dataset of dicts built with them."""
    ns = load_example("custom_strategy")
    pairs = load_hlbd()[:40]
    tok = CharTokenizer.from_pairs(pairs)
    ns["dataset"] = ns["MaskedPairs"](pairs, tok)
    ns["vocab"] = tok.vocab_size
    return ns


class Spy(Strategy):
    """Records, before clipping, the lr in use and the gradient norm as ``clip_grad_norm_`` computes it."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.norms: list[float] = []

    def before_clip(self, trainer) -> None:
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])
        # max_norm=inf: returns the total norm and scales the gradients by exactly 1
        self.norms.append(float(torch.nn.utils.clip_grad_norm_(trainer.params, float("inf"))))


def test_grad_norm_log_records_the_norm_clipping_sees(custom):
    torch.manual_seed(0)
    model = custom["MaskedSeq2Seq"](custom["vocab"], d_model=16)
    log, spy = custom["GradNormLog"](every=2), Spy()
    trainer = custom["MaskedTrainer"](model, strategies=[log, spy], lr=1e-2, batch_size=8, seed=0, progress=False)
    history = trainer.fit(custom["dataset"], epochs=2)  # 5 steps per epoch
    assert [s for s, _ in log.log] == [2, 4, 6, 8, 10]
    assert [n for _, n in log.log] == pytest.approx([spy.norms[s - 1] for s in (2, 4, 6, 8, 10)], rel=1e-5)
    assert history[0].extra["grad_norm"] == dict(log.log[:2])
    assert history[1].extra["grad_norm"] == dict(log.log[2:])
    with pytest.raises(ValueError, match=r"GradNormLog\(every=0\)"):
        custom["GradNormLog"](every=0)


def test_linear_warmup_sets_the_lr_of_each_step(custom):
    torch.manual_seed(0)
    model = custom["MaskedSeq2Seq"](custom["vocab"], d_model=16)
    spy = Spy()
    trainer = custom["MaskedTrainer"](model, strategies=[custom["LinearWarmup"](4), spy], lr=1e-2, batch_size=8, progress=False)
    trainer.fit(custom["dataset"], epochs=2)  # 40 pairs / batch 8: 5 steps per epoch
    assert spy.lrs == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2] + [1e-2] * 6, rel=1e-12)
    with pytest.raises(ValueError, match=r"LinearWarmup\(steps=0\)"):
        custom["LinearWarmup"](0)


def test_linear_warmup_across_an_epoch_boundary(custom):
    torch.manual_seed(0)
    model = custom["MaskedSeq2Seq"](custom["vocab"], d_model=16)
    spy = Spy()
    trainer = custom["MaskedTrainer"](model, strategies=[custom["LinearWarmup"](8), spy], lr=1e-2, batch_size=8, progress=False)
    trainer.fit(custom["dataset"], epochs=2)
    assert spy.lrs == pytest.approx([k / 8 * 1e-2 for k in range(1, 9)] + [1e-2] * 2, rel=1e-12)


def test_masked_trainer_counts_tokens_for_accumulation(custom):
    """The count_tokens override feeds the token normalisation: micro-batch 4 x 2 == batch 8 (dict batches)."""
    torch.manual_seed(0)
    a = custom["MaskedSeq2Seq"](custom["vocab"], d_model=16)
    b = copy.deepcopy(a)
    ha = custom["MaskedTrainer"](a, strategies=[GradientAccumulation(2)], lr=1e-2, batch_size=4, seed=3, progress=False).fit(custom["dataset"], epochs=2)
    hb = custom["MaskedTrainer"](b, lr=1e-2, batch_size=8, seed=3, progress=False).fit(custom["dataset"], epochs=2)
    assert ha.losses == pytest.approx(hb.losses, rel=1e-6)
    worst = max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(a.parameters(), b.parameters()))
    assert worst < 1e-6
    targets = int((custom["dataset"].tgt[:, 1:] != 0).sum())  # every non-pad target token, once per epoch
    assert [r.tokens for r in ha] == [r.tokens for r in hb] == [targets, targets]


def test_masked_trainer_checks_token_ids_of_dict_batches(custom):
    model = custom["MaskedSeq2Seq"](10, d_model=8)  # a vocabulary far smaller than the data's ids
    trainer = custom["MaskedTrainer"](model, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="vocabulary has 10 ids"):
        trainer.fit(custom["dataset"], epochs=1)


# ---------------------------------------------------------------------------- torch_transformer.py
@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True", "ignore:The PyTorch API of nested tensors")
def test_torch_transformer_trains_packed_with_the_padded_losses(capsys):
    main = load_example("torch_transformer")["main"]
    assert main(["--tiny", "--epochs", "2", "--compare", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Unpad mode layers" in out and "Unpad mode None" in out  # packed, then padded
    with_unpad = [float(x) for x in re.search(r"^with Unpad:\s+(.*?)\s+\(", out, flags=re.M).group(1).split(", ")]
    padded = [float(x) for x in re.search(r"^without Unpad:\s+(.*?)\s+\(", out, flags=re.M).group(1).split(", ")]
    assert len(with_unpad) == len(padded) == 2 and with_unpad[1] < with_unpad[0]  # it learns
    assert with_unpad == pytest.approx(padded, rel=1e-6)


# ---------------------------------------------------------------------------- your_own_model.py
def test_your_own_model_is_tuned_without_what_it_refuses_then_trained(capsys):
    main = load_example("your_own_model")["main"]
    assert main(["--tiny", "--budget", "12", "--epochs", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "TrimPadding refused this model" in out and "Unpad refused this model" in out
    chosen = out.split("chosen: ", 1)[1]
    assert "TrimPadding" not in chosen and "Unpad" not in chosen
    assert "trained 1 epochs with" in out
