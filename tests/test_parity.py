"""The core's numerical promises: same initial weights, same sample order, compare losses and weights."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from conftest import clone, max_rel_diff, ragged_pairs
from torch.utils.data import DataLoader, TensorDataset

from hlbd_fast import DeferredLossSync, FastTrainer, GradientAccumulation, Strategy


def seed_train_epoch(model, dataloader, optimizer, criterion, device, accumulation_steps=8):
    """The original HLBD loop, literally, with the final partial step it takes at the epoch's end."""
    model.train()
    total_loss = 0
    total_steps = 0
    for i, (src_ids, tgt_ids) in enumerate(dataloader):
        src_ids = src_ids.to(device)
        tgt_ids = tgt_ids.to(device)
        output = model(src_ids, tgt_ids[:, :-1])
        loss = criterion(output.reshape(-1, output.size(-1)), tgt_ids[:, 1:].reshape(-1))
        loss = loss / accumulation_steps
        loss.backward()
        if (i + 1) % accumulation_steps == 0 or (i + 1) == len(dataloader):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
        total_loss += loss.item() * accumulation_steps
        total_steps += 1
    return total_loss / total_steps


def fixed_loader(src, tgt, batch_size, epoch):
    """A DataLoader whose order depends only on the epoch (same for both loops)."""
    order = torch.randperm(len(src), generator=torch.Generator().manual_seed(100 + epoch)).tolist()
    return DataLoader(TensorDataset(src, tgt), batch_size=batch_size, sampler=order)


def test_accumulation_equals_big_batch(tiny_model, pairs):
    """(a) micro-batch 4 x GradientAccumulation(8) == batch 32, token-normalised, ragged lengths."""
    src, tgt = ragged_pairs(n=70)  # 70 = 2 full steps of 32 + a leftover of 6
    tokens_per_mb = [(tgt[i : i + 4, 1:] != 0).sum().item() for i in range(0, 32, 4)]
    assert len(set(tokens_per_mb)) > 1, "the test needs micro-batches with different token counts"
    a, b = clone(tiny_model), clone(tiny_model)
    ta = FastTrainer(a, strategies=[GradientAccumulation(8)], seed=1, progress=False)
    tb = FastTrainer(b, seed=1, progress=False)
    ha = ta.fit((src, tgt), epochs=2, batch_size=4)
    hb = tb.fit((src, tgt), epochs=2, batch_size=32)
    assert max_rel_diff(a, b) < 1e-6
    assert ha.losses == pytest.approx(hb.losses, rel=1e-6)
    assert [r.optimizer_steps for r in ha] == [3, 3] == [r.optimizer_steps for r in hb]
    # and the weights really moved
    assert max_rel_diff(a, tiny_model) > 1e-3


def test_micro_batch_normalisation_reproduces_seed_loop(tiny_model, pairs):
    """(b) loss_normalization='micro_batch' is the original HLBD loop, bit for bit."""
    src, tgt = pairs  # 40 pairs / 4 = 10 micro-batches: one step of 8, one leftover of 2
    ref, ours = clone(tiny_model), clone(tiny_model)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=5e-3)
    opt_ours = torch.optim.Adam(ours.parameters(), lr=5e-3)
    crit = torch.nn.CrossEntropyLoss(ignore_index=0)
    trainer = FastTrainer(ours, optimizer=opt_ours, strategies=[GradientAccumulation(8)], loss_normalization="micro_batch", progress=False)
    for epoch in range(2):
        loss_ref = seed_train_epoch(ref, fixed_loader(src, tgt, 4, epoch), opt_ref, crit, "cpu", 8)
        loss_ours = trainer.train_epoch(fixed_loader(src, tgt, 4, epoch))
        # the original loop sums float32 values via .item(); the trainer averages in float64
        assert loss_ours == pytest.approx(loss_ref, rel=1e-6)
    for p, q in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(p, q)


def test_deferred_sync_changes_nothing(tiny_model, pairs):
    """(c) DeferredLossSync changes neither weights nor reported losses."""
    a, b = clone(tiny_model), clone(tiny_model)
    ha = FastTrainer(a, strategies=[GradientAccumulation(2)], seed=3, progress=False).fit(pairs, 3, batch_size=4)
    hb = FastTrainer(b, strategies=[GradientAccumulation(2), DeferredLossSync()], seed=3, progress=False).fit(pairs, 3, batch_size=4)
    assert ha.losses == hb.losses
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def _trainer(model, **kw):
    return FastTrainer(model, strategies=[GradientAccumulation(2)], seed=5, progress=False, **kw)


def test_resume_at_epoch_boundary_equals_uninterrupted(tiny_model, pairs, tmp_path):
    """(d) fit 1 epoch, save, load into a new trainer, fit to 3 == fit 3 at once (dropout on)."""
    from conftest import TinySeq2Seq

    torch.manual_seed(0)
    base = TinySeq2Seq(dropout=0.3)
    full, part, resumed = clone(base), clone(base), clone(base)
    torch.manual_seed(123)
    h_full = _trainer(full).fit(pairs, 3, batch_size=4)
    torch.manual_seed(123)
    _trainer(part).fit(pairs, 1, batch_size=4, checkpoint_dir=tmp_path)
    torch.manual_seed(999)  # a different global RNG: the checkpoint must restore it
    t = _trainer(resumed)
    h_res = t.fit(pairs, 3, batch_size=4, checkpoint_dir=tmp_path, resume=True)
    assert h_res.losses == h_full.losses
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


class StopAfter(Strategy):
    """Asks the trainer to stop after ``n`` optimizer steps (as Ctrl-C would)."""

    def __init__(self, n: int, use_signal: bool = False) -> None:
        self.n = n
        self.use_signal = use_signal
        self._seen = 0

    def on_step_end(self, trainer) -> None:
        self._seen += 1
        if self._seen == self.n:
            if self.use_signal:
                os.kill(os.getpid(), signal.SIGINT)
            else:
                trainer.request_stop()


class Noop(Strategy):
    pass


class Augmenting(torch.utils.data.Dataset):
    """Replaces a random source token with a random id on every read: draws from torch's global RNG."""

    def __init__(self, src, tgt):
        self.src, self.tgt = src, tgt

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        s = self.src[i].clone()
        j = int(torch.randint(0, int((s != 0).sum()), ()))
        s[j] = int(torch.randint(4, 23, ()))
        return s, self.tgt[i]


@pytest.mark.parametrize("data_kind", ["tensors", "loader", "augmenting dataset"])
def test_resume_mid_epoch_equals_uninterrupted(pairs, tmp_path, data_kind):
    """(d) Ctrl-C in the middle of an epoch: checkpoint, resume, same weights and losses.

    The augmenting Dataset draws from the RNG whenever a batch is fetched: the state saved at
    the stop must be the one before the loop looked at the next batch.
    """
    from conftest import TinySeq2Seq

    torch.manual_seed(0)
    base = TinySeq2Seq(dropout=0.3)
    full, part = clone(base), clone(base)
    data = {
        "tensors": pairs,
        "loader": DataLoader(TensorDataset(*pairs), batch_size=4, shuffle=True),
        "augmenting dataset": Augmenting(*pairs),
    }[data_kind]

    torch.manual_seed(7)
    h_full = FastTrainer(full, strategies=[GradientAccumulation(2), Noop()], seed=5, progress=False).fit(data, 2, batch_size=4)

    torch.manual_seed(7)
    stopper = StopAfter(7, use_signal=True)  # epoch 1 has 5 steps: stop in epoch 2
    with pytest.raises(KeyboardInterrupt):
        FastTrainer(part, strategies=[GradientAccumulation(2), stopper], seed=5, progress=False).fit(data, 2, batch_size=4, checkpoint_dir=tmp_path)
    assert (tmp_path / "last.pt").exists()

    torch.manual_seed(999)
    resumed = clone(base)
    t = FastTrainer(resumed, strategies=[GradientAccumulation(2), Noop()], seed=5, progress=False)
    h_res = t.fit(data, 2, batch_size=4, checkpoint_dir=tmp_path, resume=True)
    assert h_res.losses == h_full.losses
    assert [r.optimizer_steps for r in h_res] == [5, 5]
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_no_strategies_is_the_plain_fp32_loop(tiny_model, pairs):
    """FastTrainer() == a hand-written token-normalised loop, step by step."""
    src, tgt = pairs
    ref, ours = clone(tiny_model), clone(tiny_model)
    trainer = FastTrainer(ours, seed=11, progress=False, lr=1e-3)
    trainer.fit(pairs, 1, batch_size=8)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    order = trainer.epoch_order(len(src), 0)
    for i in range(0, len(src), 8):
        s, t = src[order[i : i + 8]], tgt[order[i : i + 8]]
        logits = ref(s, t[:, :-1])
        loss = (
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1), ignore_index=0, reduction="sum")
            / (t[:, 1:] != 0).sum()
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    for p, q in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(p, q)
