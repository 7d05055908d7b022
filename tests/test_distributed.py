"""DistributedTraining: 2 processes at micro-batch 8 compute what 1 process at 16 computes.

The 2-process runs use gloo on CPU, started with torch.multiprocessing with the variables
torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); each child writes its
results to a file that the parent compares with one-process references.

The optimizer is SGD with momentum: linear in the gradient, so the float rounding of a
different summation order (two processes add their halves, then all-reduce) stays at the
1e-7 level in the weights. Adam divides by sqrt(v), which magnifies that rounding for
gradient entries near zero; comparing Adam's weights would test Adam's conditioning.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TinySeq2Seq, clone, max_rel_diff, ragged_pairs
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from hlbd_fast import DeferredLossSync, FastTrainer, GradientAccumulation, NonFiniteLossError, Strategy
from hlbd_fast.checkpoint import read_checkpoint
from hlbd_fast.strategies import DataLoaderWorkers, DevicePreload, Distribution
from hlbd_fast.strategies.distributed import DistributedTraining, shard_batches

WORLD = 2
SEED = 7
LR = 0.2
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the 2-process runs
class PoisonOn(Strategy):
    """Makes the model return NaN logits on one rank from a given optimizer step on."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_step_end(self, trainer) -> None:
        if int(os.environ["RANK"]) == self.rank and trainer.global_step == self.step:
            trainer.model.poison = True


class NanModel(TinySeq2Seq):
    poison = False

    def forward(self, src, tgt_in):
        out = super().forward(src, tgt_in)
        return out * float("nan") if self.poison else out


class LocalTokens(DistributedTraining):
    """The naive DDP loop: each process divides by its own token count."""

    def global_tokens(self, trainer, local):
        return local


def _summary(trainer: FastTrainer, history) -> dict:
    return {
        "state": {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()},
        "losses": history.losses,
        "tokens": [r.tokens for r in history],
        "steps": [r.optimizer_steps for r in history],
        "micro_batches": [r.micro_batches for r in history],
        "empty": [r.empty_micro_batches for r in history],
        "seed": trainer.seed,
    }


def _one_token_tail():
    """17 = 16 + 1 samples in order; the last one holds a single target token."""
    src, tgt = ragged_pairs(n=17)
    tgt[16, 2:] = 0
    return src, tgt


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init = torch.load(os.path.join(out_dir, "init.pt"))
    data45, data33 = ragged_pairs(n=45), ragged_pairs(n=33)
    results: dict = {}

    def run(name, data, strategies=(), seed=SEED, model_cls=TinySeq2Seq, **kw):
        model = model_cls()
        model.load_state_dict(init)
        ckpt, shuffle = kw.pop("checkpoint_dir", None), kw.pop("shuffle", True)
        kw.setdefault("progress", False)
        t = FastTrainer(model, strategies=[*strategies], seed=seed, optimizer=_sgd(model), batch_size=8, **kw)
        results[name + "_progress"] = t.progress
        h = t.fit(data, 2, shuffle=shuffle, checkpoint_dir=ckpt)
        results[name] = _summary(t, h)
        return t

    # rank 1 is given another seed: the strategy must make it use rank 0's
    ddp = DistributedTraining()
    t = run("plain", data45, [ddp], seed=SEED + 100 * rank, checkpoint_dir=os.path.join(out_dir, f"ckpt{rank}"))
    results["num_batches"] = t.roles.batches.num_batches(t, t.make_source(data45, 8))
    run("accum", data45, [DistributedTraining(), GradientAccumulation(2)])
    run("stand_in", TensorDataset(*data33), [DistributedTraining(), GradientAccumulation(2)])
    run("local_tokens", data45, [LocalTokens()])
    # every batch source shards under DDP: the same run as "plain"
    run("preload", data45, [DistributedTraining(), DevicePreload()])
    run("workers", data45, [DataLoaderWorkers(num_workers=0), DistributedTraining()])
    run("preload_stand_in", TensorDataset(*data33), [DistributedTraining(), DevicePreload(), GradientAccumulation(2)])
    run("micro_batch", data45, [DistributedTraining()], loss_normalization="micro_batch")
    loader = DataLoader(TensorDataset(*data45), batch_size=8, sampler=DistributedSampler(TensorDataset(*data45), seed=3))
    run("loader", loader, [DistributedTraining()])
    run("one_token_tail", _one_token_tail(), [DistributedTraining()], shuffle=False, max_grad_norm=None)
    run("bar", data45, [DistributedTraining(), DeferredLossSync(every=1)], progress=True)
    run("no_bar", data45, [DistributedTraining()], progress=True)
    try:  # rank 1's loss turns NaN in step 2; rank 0's only in step 3, through the averaged gradients
        run("nan", data45, [DistributedTraining(), PoisonOn(rank=1, step=1)], model_cls=NanModel)
    except NonFiniteLossError as e:
        results["nan_step"] = e.step
    try:
        run("plain_loader", DataLoader(TensorDataset(*data45), batch_size=8), [DistributedTraining()])
    except ValueError as e:
        results["plain_loader_error"] = str(e)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Start 2 gloo processes once (forked); return (initial weights, per-rank results, output dir)."""
    out = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    init = TinySeq2Seq().state_dict()
    torch.save(init, out / "init.pt")
    # fork: the children inherit the parent's imports. Building torch's DDP imports
    # torch._dynamo, which takes seconds per freshly spawned process on a small machine.
    importlib.import_module("torch._dynamo")

    ctx = mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False, start_method="fork")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:  # a desynchronised collective hangs: fail instead
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-process run did not finish in 120 s")
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    return init, ranks, out


def _reference(init, data, batch_size=16, strategies=(), shuffle=True, **kw):
    model = TinySeq2Seq()
    model.load_state_dict(init)
    t = FastTrainer(model, strategies=list(strategies), seed=SEED, optimizer=_sgd(model), progress=False, **kw)
    h = t.fit(data, 2, batch_size=batch_size, shuffle=shuffle)
    return model, h


def _model(state):
    m = TinySeq2Seq()
    m.load_state_dict(state)
    return m


def _assert_matches(result, ref_model, ref_history):
    ours = _model(result["state"])
    assert max_rel_diff(ours, ref_model) < 1e-6
    assert result["losses"] == pytest.approx(ref_history.losses, rel=1e-6)
    assert result["tokens"] == [r.tokens for r in ref_history]
    assert result["steps"] == [r.optimizer_steps for r in ref_history]
    assert result["micro_batches"] == [r.micro_batches for r in ref_history]
    assert result["empty"] == [0, 0] == [r.empty_micro_batches for r in ref_history]


def test_ranks_end_with_identical_weights_and_figures(ddp_runs):
    _, ranks, _ = ddp_runs
    for name in ("plain", "accum", "stand_in", "local_tokens", "micro_batch", "loader", "preload", "workers", "preload_stand_in"):
        a, b = ranks[0][name], ranks[1][name]
        for k in a["state"]:
            assert torch.equal(a["state"][k], b["state"][k]), (name, k)
        assert a["losses"] == b["losses"] and a["tokens"] == b["tokens"], name
    assert ranks[0]["plain"]["seed"] == ranks[1]["plain"]["seed"] == SEED  # rank 1 was given SEED + 100


def test_two_processes_equal_one_process_at_twice_the_batch(ddp_runs):
    init, ranks, _ = ddp_runs
    src, tgt = ragged_pairs(n=45)
    # the test needs ranks with different token counts in a step
    order = FastTrainer(TinySeq2Seq(), seed=SEED, progress=False).epoch_order(45, 0)
    halves = [shard_batches(order, 8, WORLD, r)[0] for r in range(WORLD)]
    counts = [int((tgt[h, 1:] != 0).sum()) for h in halves]
    assert counts[0] != counts[1], counts
    ref, h = _reference(init, (src, tgt))
    _assert_matches(ranks[0]["plain"], ref, h)
    assert max_rel_diff(ref, _model(init)) > 1e-3  # the weights really moved
    assert [r.optimizer_steps for r in h] == [3, 3]  # 45 = 16 + 16 + 13 (split 7/6)
    assert ranks[0]["num_batches"] == ranks[1]["num_batches"] == 3


def test_with_gradient_accumulation(ddp_runs):
    init, ranks, _ = ddp_runs
    ref, h = _reference(init, ragged_pairs(n=45), strategies=[GradientAccumulation(2)])
    _assert_matches(ranks[0]["accum"], ref, h)
    assert [r.optimizer_steps for r in h] == [2, 2]


def test_tail_smaller_than_world_uses_a_zero_token_stand_in(ddp_runs):
    """33 = 16 + 16 + 1: rank 1 has no sample for the last global batch (Dataset source)."""
    init, ranks, _ = ddp_runs
    ref, h = _reference(init, ragged_pairs(n=33), strategies=[GradientAccumulation(2)])
    _assert_matches(ranks[0]["stand_in"], ref, h)  # empty_micro_batches == 0: the stand-in is not counted


def test_every_batch_source_shards(ddp_runs):
    """DevicePreload and DataLoaderWorkers take this rank's shard from the distribution role: the plain run's results."""
    init, ranks, _ = ddp_runs
    for name in ("preload", "workers"):
        for k, v in ranks[0]["plain"]["state"].items():
            assert torch.equal(ranks[0][name]["state"][k], v), (name, k)
        assert ranks[0][name]["losses"] == ranks[0]["plain"]["losses"]
    ref, h = _reference(init, ragged_pairs(n=33), strategies=[GradientAccumulation(2)])
    _assert_matches(ranks[0]["preload_stand_in"], ref, h)  # the stand-in row, cut from preloaded data


def test_a_step_with_fewer_tokens_than_processes(ddp_runs):
    init, ranks, _ = ddp_runs
    ref, h = _reference(init, _one_token_tail(), shuffle=False, max_grad_norm=None)  # clipping would hide it
    _assert_matches(ranks[0]["one_token_tail"], ref, h)


def test_without_the_token_all_reduce_the_result_differs(ddp_runs):
    """The comparison is sensitive: dividing by each rank's own token count breaks it."""
    init, ranks, _ = ddp_runs
    ref, _ = _reference(init, ragged_pairs(n=45))
    assert max_rel_diff(_model(ranks[0]["local_tokens"]["state"]), ref) > 1e-4


def test_micro_batch_normalisation_is_the_classic_ddp_loop(ddp_runs):
    """'micro_batch': each rank's mean loss, gradients averaged; loss = mean of all micro-batch means."""
    init, ranks, _ = ddp_runs
    src, tgt = ragged_pairs(n=45)
    model = _model(init)
    opt = _sgd(model)
    order_of = FastTrainer(TinySeq2Seq(), seed=SEED, progress=False).epoch_order
    losses = []
    for epoch in range(2):
        order = order_of(45, epoch)
        per_rank = [shard_batches(order, 8, WORLD, r) for r in range(WORLD)]
        means = []
        for step in zip(*per_rank):
            total = 0.0
            for idx in step:
                s, t = src[idx], tgt[idx]
                logits = model(s, t[:, :-1])
                mean = (
                    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1), ignore_index=0, reduction="sum")
                    / (t[:, 1:] != 0).sum()
                )
                means.append(mean.item())
                total = total + mean / WORLD
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
        losses.append(sum(means) / len(means))
    result = ranks[0]["micro_batch"]
    assert max_rel_diff(_model(result["state"]), model) < 1e-6
    assert result["losses"] == pytest.approx(losses, rel=1e-6)


def test_loaders_must_shard_themselves(ddp_runs):
    """A DataLoader is used as it is: with a DistributedSampler (set_epoch called), or refused."""
    _, ranks, _ = ddp_runs
    for r in ranks:  # every rank fails the same way, so none waits for the other
        assert "DistributedSampler" in r["plain_loader_error"]
    tgt = ragged_pairs(n=45)[1]
    expected = []
    for epoch in range(2):
        total = 0
        for r in range(WORLD):
            sampler = DistributedSampler(TensorDataset(tgt), num_replicas=WORLD, rank=r, seed=3)
            sampler.set_epoch(epoch)
            total += int((tgt[list(sampler), 1:] != 0).sum())
        expected.append(total)
    assert ranks[0]["loader"]["tokens"] == expected
    assert all(math.isfinite(x) for x in ranks[0]["loader"]["losses"])


def test_loss_reads_are_in_step_on_every_rank(ddp_runs):
    """Each read is a collective: with DeferredLossSync(every=1) every rank reads every step and
    rank 0 keeps its bar; with the trainer's default (read at the epoch end) rank 0 keeps it too."""
    init, ranks, _ = ddp_runs
    assert [r["bar_progress"] for r in ranks] == [True, False]
    assert [r["no_bar_progress"] for r in ranks] == [True, False]
    ref, h = _reference(init, ragged_pairs(n=45))
    _assert_matches(ranks[0]["bar"], ref, h)


def test_a_nan_on_one_rank_stops_every_rank_at_its_first_step(ddp_runs):
    _, ranks, _ = ddp_runs
    assert [r.get("nan_step") for r in ranks] == [2, 2]


def test_only_rank_0_writes_checkpoints(ddp_runs):
    _, ranks, out = ddp_runs
    assert (out / "ckpt0" / "last.pt").exists()
    assert not (out / "ckpt1" / "last.pt").exists()
    saved = read_checkpoint(out / "ckpt0" / "last.pt")
    for k, v in ranks[0]["plain"]["state"].items():
        assert torch.equal(saved["model"][k], v)


# ---------------------------------------------------------------- the data split
@pytest.mark.parametrize("n,b,w", [(45, 8, 2), (33, 8, 2), (16, 8, 2), (7, 2, 4), (50, 3, 3), (2, 4, 3)])
def test_shard_batches_keeps_the_global_order(n, b, w):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    shards = [shard_batches(order, b, w, r) for r in range(w)]
    assert len({len(s) for s in shards}) == 1  # every rank the same number of micro-batches
    glued = torch.cat([shards[r][i] for i in range(len(shards[0])) for r in range(w)])
    assert torch.equal(glued, order)  # global batch i, rank by rank, is order[i*b*w:(i+1)*b*w]
    for i in range(len(shards[0]) - 1):
        assert all(len(s[i]) == b for s in shards)
    sizes = [len(s[-1]) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard_batches(order, b, w, w)


# ---------------------------------------------------------------- without torchrun
@pytest.fixture
def no_env(monkeypatch):
    for k in ENV:
        monkeypatch.delenv(k, raising=False)
    assert not dist.is_initialized()


def test_no_op_without_torchrun(no_env, tiny_model, pairs, caplog):
    """One process: the one-process default's behaviour, with any batch source, and one log line."""
    s = DistributedTraining()
    assert s.role == "distribution" and not s.active and s.world_size == 1 and s.is_main
    a, b = clone(tiny_model), clone(tiny_model)
    with caplog.at_level(logging.INFO, logger="hlbd_fast"):
        ta = FastTrainer(a, strategies=[s, DevicePreload(), GradientAccumulation(2)], seed=2, progress=False)
    assert sum("not launched by torchrun" in r.getMessage() for r in caplog.records) == 1
    assert ta.roles.distribution is s and ta.train_model is a
    ha = ta.fit(pairs, 2, batch_size=4)
    hb = FastTrainer(b, strategies=[GradientAccumulation(2)], seed=2, progress=False).fit(pairs, 2, batch_size=4)
    assert ha.losses == hb.losses
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ---------------------------------------------------------------- bad set-ups
@pytest.mark.parametrize(
    "env,match",
    [
        ({"WORLD_SIZE": "2"}, "RANK is not"),
        ({"RANK": "0"}, "WORLD_SIZE is not"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "0 <= RANK < WORLD_SIZE"),
        ({"RANK": "a", "WORLD_SIZE": "2"}, "must be integers"),
    ],
)
def test_half_set_torchrun_variables_are_refused(no_env, monkeypatch, env, match):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match) as e:
        DistributedTraining()
    assert "torchrun" in str(e.value)


def test_no_rendezvous_is_refused(no_env, monkeypatch, tiny_model):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(ValueError, match="MASTER_ADDR is not.*torchrun"):
        FastTrainer(tiny_model, strategies=[DistributedTraining()], progress=False)
    assert not dist.is_initialized()


def test_nccl_without_cuda_is_refused(no_env, monkeypatch, tiny_model):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="backend 'nccl' needs CUDA.*backend='gloo'"):
        FastTrainer(tiny_model, strategies=[DistributedTraining(backend="nccl")], progress=False)
    assert not dist.is_initialized()


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match=r"backend='mpi'.*\('nccl', 'gloo'\)"):
        DistributedTraining(backend="mpi")


# ---------------------------------------------------------------- one process, group initialised
@pytest.fixture
def world_of_one(no_env, monkeypatch):
    """torchrun's variables for a 1-process run; the group the strategy starts is destroyed after."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(k, v)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_world_of_one_is_the_plain_loop_exactly(world_of_one, tiny_model, pairs):
    a, b = clone(tiny_model), clone(tiny_model)
    s = DistributedTraining()
    ta = FastTrainer(a, strategies=[s, GradientAccumulation(2)], seed=3, lr=LR, progress=False)
    assert s.active and dist.get_backend() == "gloo" and ta.roles.distribution is s
    assert isinstance(ta.train_model, torch.nn.parallel.DistributedDataParallel)
    ha = ta.fit(pairs, 2, batch_size=8)
    hb = FastTrainer(b, strategies=[GradientAccumulation(2)], seed=3, lr=LR, progress=False).fit(pairs, 2, batch_size=8)
    assert ha.losses == hb.losses
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_device_preload_shards_under_torchrun(world_of_one, tiny_model, pairs):
    """DevicePreload takes its micro-batches from the distribution role: a world of one is the plain loop."""
    a, b = clone(tiny_model), clone(tiny_model)
    ha = FastTrainer(a, strategies=[DistributedTraining(), DevicePreload()], seed=3, lr=LR, progress=False).fit(pairs, 2, batch_size=8)
    hb = FastTrainer(b, seed=3, lr=LR, progress=False).fit(pairs, 2, batch_size=8)
    assert ha.losses == hb.losses
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_unpad_under_torchrun_is_the_one_process_unpad(world_of_one, pairs):
    """Unpad's call goes through torch's DDP wrapper (forward with unpad=); token counts stay the trainer's."""
    from hlbd_fast import Unpad
    from hlbd_fast.models import Seq2SeqTransformer

    torch.manual_seed(0)
    base = Seq2SeqTransformer(vocab_size=23, d_model=16, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=32, dropout=0.0, max_length=16)
    a, b = clone(base), clone(base)
    ha = FastTrainer(a, strategies=[DistributedTraining(), Unpad(), GradientAccumulation(2)], seed=3, lr=LR, optimizer=_sgd(a), progress=False).fit(
        pairs, 2, batch_size=8
    )
    hb = FastTrainer(b, strategies=[Unpad(), GradientAccumulation(2)], seed=3, optimizer=_sgd(b), progress=False).fit(pairs, 2, batch_size=8)
    assert ha.losses == hb.losses and [r.tokens for r in ha] == [r.tokens for r in hb]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True", "ignore:Support for mismatched")
def test_unpad_of_torch_layers_under_torchrun_is_the_one_process_unpad(world_of_one, pairs):
    """The packed nn.Transformer layers run inside torch's DDP wrapper as they do alone."""
    from conftest import TorchSeq2Seq

    from hlbd_fast import Unpad

    base = TorchSeq2Seq()
    a, b = clone(base), clone(base)
    ta = FastTrainer(a, strategies=[DistributedTraining(), Unpad()], seed=3, optimizer=_sgd(a), progress=False)
    ha = ta.fit(pairs, 2, batch_size=8)
    hb = FastTrainer(b, strategies=[Unpad()], seed=3, optimizer=_sgd(b), progress=False).fit(pairs, 2, batch_size=8)
    assert ta.roles.forward.mode == "layers"
    assert ha.losses == hb.losses and [r.tokens for r in ha] == [r.tokens for r in hb]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_a_model_already_in_ddp_is_refused(world_of_one, tiny_model):
    FastTrainer(clone(tiny_model), strategies=[DistributedTraining()], progress=False)  # starts the group
    wrapped = torch.nn.parallel.DistributedDataParallel(clone(tiny_model))
    with pytest.raises(ValueError, match="already wrapped in torch's DistributedDataParallel.*model.module"):
        FastTrainer(wrapped, strategies=[DistributedTraining()], progress=False)
    with pytest.raises(ValueError, match="already wrapped"):
        DistributedTraining().wrap_model(None, wrapped)


def test_gradients_are_all_reduced_once_per_optimizer_step(world_of_one, tiny_model, pairs):
    """Accumulation micro-steps run under no_sync: 40 samples / 8 = 5 micro-batches = 3 steps per epoch."""
    calls = []

    def counting_hook(state, bucket):
        calls.append(1)
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())  # one process: the average is the gradient itself
        return fut

    t = FastTrainer(tiny_model, strategies=[DistributedTraining(), GradientAccumulation(2)], progress=False)
    t.train_model.register_comm_hook(None, counting_hook)
    t.fit(pairs, 2, batch_size=8)
    assert len(calls) == 6  # one bucket (a tiny model) per step; 10 without no_sync


def test_a_group_started_after_the_strategy_is_refused(no_env, tiny_model):
    s = DistributedTraining()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="after DistributedTraining"):
            FastTrainer(tiny_model, strategies=[s], progress=False)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- the device, decided before anything moves
def test_the_device_is_decided_before_the_model_moves(no_env):
    """Under torchrun every rank used to move the model to GPU 0 first; the distribution role decides first now."""
    order = []

    class Tracked(TinySeq2Seq):
        def to(self, *args, **kwargs):
            order.append("model.to")
            return super().to(*args, **kwargs)

    class Deciding(Distribution):
        def resolve_device(self, device):
            order.append("resolve_device")
            return device

    FastTrainer(Tracked(), strategies=[Deciding()], progress=False)
    assert order[:2] == ["resolve_device", "model.to"]


@pytest.mark.parametrize("local_rank, visible, expected", [("0", 2, "cuda:0"), ("1", 2, "cuda:1"), ("3", 1, "cuda:0")])
def test_local_device_with_all_gpus_or_one_visible_per_process(monkeypatch, local_rank, visible, expected):
    from hlbd_fast.strategies import distributed

    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert distributed.local_device(torch.device("cuda")) == torch.device(expected)


def test_more_local_ranks_than_visible_gpus_is_refused(monkeypatch):
    from hlbd_fast.strategies import distributed

    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="LOCAL_RANK=2 but this process sees 2 CUDA devices.*CUDA_VISIBLE_DEVICES"):
        distributed.local_device(torch.device("cuda"))
