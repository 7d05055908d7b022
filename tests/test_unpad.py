"""Unpad: only real tokens reach the model, with the padded loop's numbers (up to float rounding)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TinySeq2Seq, TorchSeq2Seq, clone, ragged_pairs
from torch import nn

from hlbd_fast import (
    Compile,
    DeferredLossSync,
    DevicePreload,
    FastDropout,
    FastTrainer,
    FusedAdamW,
    GradientAccumulation,
    MixedPrecision,
    StrategyConflictError,
    TrimPadding,
    Unpad,
    presets,
    verify_unpad,
)
from hlbd_fast.doctor import diagnose
from hlbd_fast.models import Seq2SeqTransformer
from hlbd_fast.packing import UnpadBatch, packed_sizes, source_packing, target_packing


def reference(dropout: float = 0.0, seed: int = 0) -> Seq2SeqTransformer:
    torch.manual_seed(seed)
    return Seq2SeqTransformer(vocab_size=23, d_model=16, n_encoder_layers=2, n_decoder_layers=2, n_heads=2, d_ff=32, dropout=dropout, max_length=32)


def padded(n: int = 40, extra: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    src, tgt = ragged_pairs(n=n, seed=seed)
    z = torch.zeros(n, extra, dtype=torch.long)
    return torch.cat([src, z], 1), torch.cat([tgt, z], 1)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


KEY_BIAS_SLICES = {"self_attn.qkv.bias": slice(16, 32), "cross_attn.kv.bias": slice(0, 16)}


def weight_diffs(a: nn.Module, b: nn.Module, skip_key_biases: bool = False) -> float:
    """Largest per-tensor relative difference; optionally without attention's key biases (see the Adam test)."""
    worst = 0.0
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if skip_key_biases:
            key = next((s for k, s in KEY_BIAS_SLICES.items() if name.endswith(k)), None)
            if key is not None:
                keep = torch.ones(p.shape[0], dtype=torch.bool)
                keep[key] = False
                p, q = p[keep], q[keep]
        worst = max(worst, rel_diff(p.detach(), q.detach()))
    return worst


# ---------------------------------------------------------------------------- packing
def test_pack_and_unpack_round_trip():
    src = torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0], [0, 0, 0, 0]])
    p = source_packing(src, 0)
    assert p.tokens == 4 and p.positions.tolist() == [0, 1, 0, 0]  # the all-pad row keeps position 0
    assert p.pack(src).tolist() == [5, 6, 7, 0]
    x = torch.randn(3, 4, 2)
    back = p.unpack(p.pack(x))
    assert torch.equal(back[p.key_mask[:, 0, 0, :]], x[p.key_mask[:, 0, 0, :]])
    assert (back[~p.key_mask[:, 0, 0, :]] == 0).all()


def test_filler_rows_round_the_packing_up_and_stay_out_of_attention_and_the_loss():
    src = torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0], [8, 9, 4, 0]])
    p = source_packing(src, 0, multiple_of=4)
    assert (p.tokens, p.length) == (6, 8)
    assert p.pack(src).tolist() == [5, 6, 7, 8, 9, 4, 5, 5]  # fillers repeat the first real position
    assert p.pack(src, fill=0).tolist() == [5, 6, 7, 8, 9, 4, 0, 0]  # targets: the loss ignores pad
    y = torch.arange(8.0)[:, None]
    back = p.unpack(y)  # fillers are dropped: only the real rows land, in place
    assert back[..., 0].tolist() == [[0, 1, 0, 0], [2, 0, 0, 0], [3, 4, 5, 0]]
    exact = source_packing(src, 0, multiple_of=3)
    assert exact.tokens == exact.length == 6  # already a multiple: no filler


def test_target_packing_keeps_every_position_up_to_the_last_scored_one():
    tgt_out = torch.tensor([[4, 5, 3, 0], [6, 0, 7, 3], [3, 0, 0, 0]])  # row 1 has an interior pad
    p = target_packing(tgt_out, 0)
    assert p.positions.tolist() == [0, 1, 2, 0, 1, 2, 3, 0]


def test_the_reference_models_packed_logits_are_its_padded_logits():
    model = reference().eval()
    src, tgt = padded(n=16)
    u = UnpadBatch.of(src, tgt, 0)
    with torch.no_grad():
        full, packed = model(src, tgt[:, :-1]), model(src, tgt[:, :-1], unpad=u)
    assert packed.shape == (u.target.tokens, 23) and u.target.tokens < tgt[:, 1:].numel()
    assert rel_diff(packed, u.target.pack(full)) < 1e-5
    check = verify_unpad(model, (src, tgt))
    assert check.padded_positions > 0 and check.max_logit_diff < 1e-5


def test_filler_rows_leave_the_real_rows_logits_as_they_were():
    model = reference().eval()
    src, tgt = padded(n=16)
    u, r = UnpadBatch.of(src, tgt, 0, multiple_of=32), UnpadBatch.of(src, tgt, 0)
    assert u.target.length % 32 == 0 and u.target.length > u.target.tokens == r.target.tokens
    with torch.no_grad():
        rounded, plain = model(src, tgt[:, :-1], unpad=u), model(src, tgt[:, :-1], unpad=r)
    assert rounded.shape == (u.target.length, 23)
    assert rel_diff(rounded[: r.target.tokens], plain) < 1e-6
    assert u.targets(tgt, 0)[u.target.tokens :].eq(0).all()  # the fillers' targets are padding
    assert verify_unpad(model, (src, tgt), multiple_of=32).max_logit_diff < 1e-5


def test_packing_from_sizes_known_on_the_host_is_the_packing_found_on_the_device():
    src = torch.tensor([[5, 0, 6, 0], [0, 0, 0, 0], [8, 9, 4, 7]])  # an interior pad, a row of padding only
    tgt = torch.tensor([[2, 4, 0, 5, 0], [2, 0, 0, 0, 0], [0, 0, 0, 0, 0], [2, 6, 7, 3, 0]][:3])
    ns, nt = packed_sizes(src, tgt, 0)
    assert ns.tolist() == [2, 1, 4] and nt.tolist() == [3, 0, 0]
    for multiple in (1, 4):
        found, known = UnpadBatch.of(src, tgt, 0, multiple), UnpadBatch.of(src, tgt, 0, multiple, sizes=(int(ns.sum()), int(nt.sum())))
        for a, b in ((found.source, known.source), (found.target, known.target)):
            assert torch.equal(a.index, b.index) and torch.equal(a.positions, b.positions) and (a.tokens, a.length) == (b.tokens, b.length)


def host_syncs(strategies, data) -> list[tuple[str, float]]:
    """What the doctor's sync counter sees in a step (on a CPU: the operations that would wait for a GPU)."""
    torch.manual_seed(0)
    model = Seq2SeqTransformer(vocab_size=23, d_model=16, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=32, dropout=0.0, max_length=32)
    d = diagnose(model, data, strategies=[*strategies, DeferredLossSync()], steps=2, batch_size=4, lr=1e-3)
    per_op: dict[str, float] = {}
    for s in d.sync_sources:  # by module and operator: summed by operator
        per_op[s.op] = per_op.get(s.op, 0.0) + s.per_step
    return sorted(per_op.items())


@pytest.mark.parametrize("trim", [False, True], ids=["preload", "preload+trim"])
def test_with_lengths_known_on_the_host_packing_makes_no_host_sync(trim):
    """DevicePreload knows each micro-batch's sizes on the host (TrimPadding passes them on): no nonzero per step.
    Without it the sizes are counted on the device and read back: two syncs per micro-batch (sources, targets)."""
    data = padded()
    trimming = [TrimPadding(multiple_of=1)] if trim else []
    assert host_syncs([DevicePreload(), *trimming, GradientAccumulation(2), Unpad()], data) == []
    assert host_syncs([*trimming, GradientAccumulation(2), Unpad()], data) == [("aten::nonzero", 4.0)]


def test_packing_from_host_sizes_trains_exactly_as_packing_found_on_the_device():
    """The same packings, so the same numbers: bit for bit against Unpad without preloading, 1e-6 against the padded loop."""
    data = padded()
    base = reference()
    known, found, ref = clone(base), clone(base), clone(base)
    kw = dict(seed=3, progress=False, batch_size=4, lr=1e-3)
    h = FastTrainer(known, strategies=[DevicePreload(last_batch="pad"), TrimPadding(multiple_of=1), GradientAccumulation(2), Unpad()], **kw).fit(data, 2)
    h_found = FastTrainer(found, strategies=[TrimPadding(multiple_of=1), GradientAccumulation(2), Unpad()], **kw).fit(data, 2)
    h_ref = FastTrainer(ref, strategies=[GradientAccumulation(2)], **kw).fit(data, 2)
    assert h.losses == h_found.losses and all(torch.equal(p, q) for p, q in zip(known.parameters(), found.parameters()))
    assert h.losses == pytest.approx(h_ref.losses, rel=1e-6)
    assert weight_diffs(known, ref, skip_key_biases=True) < 1e-4


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_packing_from_host_sizes_makes_no_sync_on_cuda():
    """On the GPU itself: torch's sync debug mode raises at any sync while the batch is packed, used and unpacked."""
    src, tgt = padded(n=16)
    ns, nt = packed_sizes(src, tgt, 0)
    src, tgt = src.cuda(), tgt.cuda()
    x = torch.randn(*src.shape, 8, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        u = UnpadBatch.of(src, tgt, 0, 8, sizes=(int(ns.sum()), int(nt.sum())))
        back = u.source.unpack(u.source.pack(x))
        targets = u.targets(tgt, 0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    found = UnpadBatch.of(src, tgt, 0, 8)
    assert torch.equal(u.source.index, found.source.index) and torch.equal(u.target.index, found.target.index)
    assert torch.equal(targets, found.targets(tgt, 0)) and torch.equal(back, found.source.unpack(found.source.pack(x)))


# ---------------------------------------------------------------------------- parity with the padded loop
def test_training_equals_the_padded_loop_with_sgd():
    """Two epochs, dropout off, SGD: per-epoch losses within 1e-6, every weight within 1e-4 (relative)."""
    data = padded()
    base = reference()
    ours, ref = clone(base), clone(base)
    kw = dict(seed=3, progress=False, batch_size=8)
    h = FastTrainer(ours, strategies=[Unpad()], optimizer=torch.optim.SGD(ours.parameters(), lr=0.3), **kw).fit(data, 2)
    h_ref = FastTrainer(ref, optimizer=torch.optim.SGD(ref.parameters(), lr=0.3), **kw).fit(data, 2)
    assert h.losses == pytest.approx(h_ref.losses, rel=1e-6)
    assert weight_diffs(ours, ref) < 1e-4
    assert weight_diffs(ours, base) > 1e-3  # the weights moved
    assert [r.tokens for r in h] == [r.tokens for r in h_ref]


def test_training_with_filler_rows_equals_the_padded_loop():
    """Rounded up to 16 packed rows: the fillers get no gradient, so SGD moves the same weights."""
    data = padded()
    base = reference()
    ours, ref = clone(base), clone(base)
    kw = dict(seed=3, progress=False, batch_size=8)
    seen = []
    ours.encoder_layers[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[0]) if o.dim() == 2 else None)  # packed runs only
    h = FastTrainer(ours, strategies=[Unpad(multiple_of=16)], optimizer=torch.optim.SGD(ours.parameters(), lr=0.3), **kw).fit(data, 2)
    h_ref = FastTrainer(ref, optimizer=torch.optim.SGD(ref.parameters(), lr=0.3), **kw).fit(data, 2)
    assert seen and all(n % 16 == 0 for n in seen)
    assert h.losses == pytest.approx(h_ref.losses, rel=1e-6)
    assert weight_diffs(ours, ref) < 1e-4
    assert [r.tokens for r in h] == [r.tokens for r in h_ref]


def test_rows_are_rounded_up_to_32_under_cpu_autocast_only():
    u = Unpad()
    cpu = torch.device("cpu")
    assert u.rows_multiple(cpu) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert u.rows_multiple(cpu) == 32
        assert Unpad(multiple_of=4).rows_multiple(cpu) == 4  # an explicit multiple wins
    assert Unpad(multiple_of=4).rows_multiple(cpu) == 4


@pytest.mark.filterwarnings("ignore:MixedPrecision\\('bf16'\\) on a CPU without native bf16")
def test_bf16_training_packs_rows_in_multiples_of_32():
    model = reference()
    seen = []
    model.decoder_layers[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[0]) if o.dim() == 2 else None)  # packed runs only
    FastTrainer(model, strategies=[Unpad(), MixedPrecision("bf16")], seed=1, progress=False, batch_size=8).fit(padded(), 1)
    assert seen and all(n % 32 == 0 for n in seen)


def test_training_equals_the_padded_loop_with_adam():
    """Adam: losses within 1e-6; weights within 1e-4 but for attention's key biases.

    A key bias gets a zero gradient in exact arithmetic (softmax ignores a shift shared by all
    keys), so its gradient is rounding noise, and Adam turns any noise into full steps: any
    change of rounding (trimming, packing) moves those entries apart from the padded loop's.
    They do not change what the model computes.
    """
    data = padded()
    base = reference()
    ours, ref = clone(base), clone(base)
    kw = dict(seed=3, progress=False, batch_size=8, lr=1e-3)
    h = FastTrainer(ours, strategies=[Unpad()], **kw).fit(data, 2)
    h_ref = FastTrainer(ref, **kw).fit(data, 2)
    assert h.losses == pytest.approx(h_ref.losses, rel=1e-6)
    assert weight_diffs(ours, ref, skip_key_biases=True) < 1e-4


@pytest.mark.parametrize(
    "name, strategies, reference_strategies",
    [
        ("accumulation + deferred sync", [GradientAccumulation(2), DeferredLossSync()], [GradientAccumulation(2)]),
        ("preload + trim + fused adamw", [DevicePreload(), TrimPadding(multiple_of=1), FusedAdamW()], [FusedAdamW()]),
    ],
)
def test_combines_with_the_other_exact_strategies(name, strategies, reference_strategies):
    data = padded()
    base = reference()
    ours, ref = clone(base), clone(base)
    kw = dict(seed=5, progress=False, batch_size=4, lr=1e-3)
    h = FastTrainer(ours, strategies=[Unpad(), *strategies], **kw).fit(data, 2)
    h_ref = FastTrainer(ref, strategies=reference_strategies, **kw).fit(data, 2)
    assert h.losses == pytest.approx(h_ref.losses, rel=1e-6)
    assert weight_diffs(ours, ref, skip_key_biases=True) < 1e-4


@pytest.mark.filterwarnings("ignore:MixedPrecision\\('bf16'\\) on a CPU without native bf16")
def test_combines_with_bf16_within_its_tolerance():
    data = padded()
    base = reference()
    ours, ref = clone(base), clone(base)
    kw = dict(seed=5, progress=False, batch_size=8, lr=3e-3)
    h = FastTrainer(ours, strategies=[Unpad(), MixedPrecision("bf16")], **kw).fit(data, 3)
    h_ref = FastTrainer(ref, **kw).fit(data, 3)
    assert h.losses[-1] == pytest.approx(h_ref.losses[-1], rel=0.02)


def test_dropout_masks_real_elements_at_the_keep_rate_with_the_scale():
    """With dropout on the stream differs (masks over real elements only): check the masks' law."""
    model = reference(dropout=0.25)
    seen = []
    model.encoder_layers[0].ff.drop.register_forward_hook(lambda m, i, o: seen.append((i[0].detach(), o.detach())))
    src, tgt = padded(n=40)
    FastTrainer(model, strategies=[Unpad(check=False), FastDropout()], seed=1, progress=False, batch_size=40).fit((src, tgt), 1)
    x, y = seen[0]
    assert x.dim() == 2 and x.shape[0] == UnpadBatch.of(src, tgt, 0).source.tokens  # packed rows: real tokens only
    kept = y != 0
    assert abs(float(kept.float().mean()) - 0.75) < 0.03
    assert torch.allclose(y[kept], x[kept] / 0.75)


def test_evaluate_uses_it_and_agrees_with_the_padded_evaluation():
    data = padded(n=24)
    t = FastTrainer(reference(), strategies=[Unpad()], progress=False)
    plain = FastTrainer(reference(), progress=False)
    a, b = t.evaluate(data), plain.evaluate(data)
    assert a["tokens"] == b["tokens"] and a["token_accuracy"] == b["token_accuracy"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


# ---------------------------------------------------------------------------- refusals
class LeakyReference(Seq2SeqTransformer):
    """Attends to padded source keys (as the original APTModel does): padding reaches real positions."""

    def source_mask(self, src):
        return torch.ones_like(super().source_mask(src))


def tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def tf32_on():
    """TF32 on, as AllowTF32's run scope leaves it; the flags as they were after."""
    saved = tf32_flags()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class SeesTF32(Seq2SeqTransformer):
    """Records the TF32 flags in force at every forward, padded or packed."""

    seen: list

    def forward(self, src, tgt_in, unpad=None):
        self.seen.append(tf32_flags())
        return super().forward(src, tgt_in, unpad=unpad)


class LeaksAndSeesTF32(SeesTF32, LeakyReference):
    pass


@pytest.mark.parametrize("leaks", [False, True], ids=["exact", "refused"])
def test_the_proof_runs_with_tf32_off_and_restores_it(tf32_on, leaks):
    torch.manual_seed(0)
    kind = LeaksAndSeesTF32 if leaks else SeesTF32
    model = kind(vocab_size=23, d_model=16, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=32, dropout=0.0, max_length=32)
    model.seen = []
    if leaks:
        with pytest.raises(ValueError, match="verify_unpad: running only the real tokens changed"):
            verify_unpad(model, padded(n=8))
    else:
        verify_unpad(model, padded(n=8))
    assert model.seen == [(False, False)] * 2  # the padded and the packed forward, in fp32
    assert tf32_flags() == (True, True)  # restored, on the error too


def test_a_model_without_the_protocol_is_refused_when_the_trainer_is_built():
    with pytest.raises(ValueError, match="Unpad cannot run TinySeq2Seq.*accept unpad=UnpadBatch"):
        FastTrainer(TinySeq2Seq(), strategies=[Unpad()], progress=False)


def test_a_model_that_lets_padding_leak_is_refused_before_any_step():
    torch.manual_seed(0)
    model = LeakyReference(vocab_size=23, d_model=16, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=32, dropout=0.0, max_length=32)
    before = [p.detach().clone() for p in model.parameters()]
    t = FastTrainer(model, strategies=[Unpad()], progress=False)
    with pytest.raises(ValueError, match="Unpad refused this model on its first batch.*padding reach real positions"):
        t.fit(padded(), 1, batch_size=8)
    assert t.global_step == 0 and all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


def test_fastest_leaves_out_what_a_leaking_model_refuses_and_trains_it_exactly():
    """The user's APTModel case: attention over padded keys. fastest warns, leaves TrimPadding and Unpad out
    (history.left_out says why) and trains what fastest without them trains, from the same weights."""
    import warnings

    from hlbd_fast import TrimPadding, presets

    torch.manual_seed(0)
    base = LeakyReference(vocab_size=23, d_model=16, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=32, dropout=0.0, max_length=32)
    a, b = clone(base), clone(base)
    kw = {"device": "cpu", "progress": False, "seed": 4, "lr": 1e-3}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ha = FastTrainer.from_preset(a, "fastest", **kw).fit(padded(), 2, batch_size=8)
    left = [str(w.message) for w in record if "left out of this run" in str(w.message)]
    assert len(left) == 2 and sorted(ha.left_out) == ["TrimPadding", "Unpad"]
    hb = FastTrainer.from_preset(b, presets.fastest("cpu").without(TrimPadding, Unpad), **kw).fit(padded(), 2, batch_size=8)
    assert ha.losses == hb.losses and all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("other", [Compile(backend="eager")], ids=["compile"])
def test_uncapturable_combinations_are_refused(other):
    with pytest.raises(StrategyConflictError, match=r"Compile\(.*cannot run with Unpad.*compiles again for every new shape"):
        FastTrainer(reference(), strategies=[Unpad(), other], progress=False)


def test_a_trainer_that_runs_its_own_forward_is_refused_with_unpad():
    class Own(FastTrainer):
        def forward_logits(self, model, batch):
            return super().forward_logits(model, batch)

    with pytest.raises(StrategyConflictError, match="Own.forward_logits runs the model itself.*Unpad"):
        Own(reference(), strategies=[Unpad()], progress=False)
    Own(reference(), progress=False)  # without a forward strategy: fine


def test_bad_arguments():
    with pytest.raises(ValueError, match="Unpad\\(check='no'\\)"):
        Unpad(check="no")
    with pytest.raises(ValueError, match="Unpad\\(multiple_of=0\\): multiple_of must be an integer >= 1"):
        Unpad(multiple_of=0)
    with pytest.raises(ValueError, match="source_packing\\(multiple_of=2.5\\)"):
        source_packing(torch.ones(2, 3, dtype=torch.long), 0, multiple_of=2.5)


# ---------------------------------------------------------------------------- the preset
def test_cpu_fastest_unpads_models_that_support_it():
    assert any(isinstance(s, Unpad) for s in presets.fastest("cpu").strategies)
    t = FastTrainer.from_preset(reference(), "fastest", device="cpu", progress=False)
    assert isinstance(t.roles.forward, Unpad)
    t = FastTrainer.from_preset(TinySeq2Seq(), "fastest", device="cpu", progress=False)  # no protocol: left out
    assert not any(isinstance(s, Unpad) for s in t.strategies)


# ---------------------------------------------------------------------------- attention with dropout on CPU
@pytest.mark.parametrize("kind", ["key mask", "causal", "cross"])
def test_dropout_attention_is_sdpa_with_dropout_for_the_same_draws(kind):
    """The packed model's CPU attention with dropout: SDPA's computation, the same masks for the same seed."""
    from hlbd_fast.models.transformer import dropout_attention

    b, h, length, d = 5, 2, 7, 8
    s = 4 if kind == "cross" else length
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for n in (length, s, s))
    keep = torch.rand(b, 1, 1, s) > 0.4
    keep[..., 0] = True
    mask = None if kind == "causal" else keep
    grad = torch.randn(b, h, length, d)
    outs = []
    for fn in (F.scaled_dot_product_attention, dropout_attention):
        torch.manual_seed(9)
        if fn is dropout_attention:
            y = fn(q, k, v, mask, kind == "causal", 0.3)
        else:
            y = fn(q, k, v, attn_mask=mask, dropout_p=0.3, is_causal=kind == "causal")
        y.backward(grad)
        outs.append([y.detach()] + [t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    for a, c in zip(*outs):
        assert rel_diff(c, a) < 1e-5
    undropped = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=kind == "causal").detach()
    assert rel_diff(outs[1][0], undropped) > 1e-2  # dropout did act


def test_dropout_attention_keeps_the_input_dtype_under_autocast():
    from hlbd_fast.models.transformer import dropout_attention

    q = torch.randn(2, 2, 3, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dropout_attention(q, q, q, None, True, 0.1)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


# ---------------------------------------------------------------------------- models built from torch's layers
TORCH_KEY_BIASES = {"in_proj_bias": slice(16, 32)}  # nn.MultiheadAttention's packed q, k, v biases


def torch_weight_diffs(a: nn.Module, b: nn.Module) -> float:
    worst = 0.0
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if name.endswith("in_proj_bias"):  # the key biases: zero gradient in exact arithmetic (see the Adam test)
            keep = torch.ones(p.shape[0], dtype=torch.bool)
            keep[TORCH_KEY_BIASES["in_proj_bias"]] = False
            p, q = p[keep], q[keep]
        worst = max(worst, rel_diff(p.detach(), q.detach()))
    return worst


pytestmark_torch_layers = pytest.mark.filterwarnings(
    "ignore:enable_nested_tensor is True", "ignore:Support for mismatched", "ignore:The PyTorch API of nested tensors"
)


@pytestmark_torch_layers
@pytest.mark.parametrize("batch_first, norm_first", [(True, False), (False, True)])
def test_a_torch_transformer_trains_packed_as_the_padded_loop(batch_first, norm_first):
    """nn.Transformer with key padding masks: its layers run on real rows; SGD losses within 1e-6, weights 1e-4."""
    data = padded()
    base = TorchSeq2Seq(batch_first=batch_first, norm_first=norm_first)
    ours, ref = clone(base), clone(base)
    rows = []
    ours.transformer.decoder.layers[1].linear1.register_forward_hook(lambda m, i, o: rows.append(i[0].dim()))
    kw = dict(seed=3, progress=False, batch_size=8)
    t = FastTrainer(ours, strategies=[Unpad()], optimizer=torch.optim.SGD(ours.parameters(), lr=0.3), **kw)
    h = t.fit(data, 2)
    h_ref = FastTrainer(ref, optimizer=torch.optim.SGD(ref.parameters(), lr=0.3), **kw).fit(data, 2)
    assert t.roles.forward.mode == "layers"
    assert rows.count(2) == 1 + 2 * 5 and rows.count(3) == 1  # the proof (padded, packed), then every step packed
    assert h.losses == pytest.approx(h_ref.losses, rel=1e-6)
    assert weight_diffs(ours, ref) < 1e-4 and weight_diffs(ours, base) > 1e-3
    assert all("forward" not in vars(m) for m in ours.modules())  # the surgery is gone after fit


@pytestmark_torch_layers
def test_a_torch_transformer_with_adam_evaluation_and_filler_rows():
    data = padded()
    base = TorchSeq2Seq()
    ours, ref = clone(base), clone(base)
    kw = dict(seed=5, progress=False, batch_size=8, lr=1e-3)
    t = FastTrainer(ours, strategies=[Unpad(multiple_of=16)], **kw)
    h = t.fit(data, 2)
    plain = FastTrainer(ref, **kw)
    h_ref = plain.fit(data, 2)
    assert h.losses == pytest.approx(h_ref.losses, rel=1e-6)
    assert torch_weight_diffs(ours, ref) < 1e-4
    a, b = t.evaluate(data), plain.evaluate(data)
    assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytestmark_torch_layers
@pytest.mark.parametrize(
    "strategies, reference_strategies",
    [
        ([GradientAccumulation(2), DeferredLossSync()], [GradientAccumulation(2)]),
        ([DevicePreload(), TrimPadding(multiple_of=1), FusedAdamW()], [FusedAdamW()]),
    ],
    ids=["accumulation + deferred sync", "preload + trim + fused adamw"],
)
def test_a_torch_transformer_combines_with_the_other_exact_strategies(strategies, reference_strategies):
    data = padded()
    base = TorchSeq2Seq(norm_first=True)
    ours, ref = clone(base), clone(base)
    kw = dict(seed=5, progress=False, batch_size=4, lr=1e-3)
    h = FastTrainer(ours, strategies=[Unpad(), *strategies], **kw).fit(data, 2)
    h_ref = FastTrainer(ref, strategies=reference_strategies, **kw).fit(data, 2)
    assert h.losses == pytest.approx(h_ref.losses, rel=1e-6)
    assert torch_weight_diffs(ours, ref) < 1e-4


@pytestmark_torch_layers
def test_a_torch_transformer_with_dropout_and_bf16_stays_close():
    data = padded()
    base = TorchSeq2Seq(dropout=0.1)
    rows = []
    ours, ref = clone(base), clone(base)
    ours.transformer.encoder.layers[0].linear1.register_forward_hook(lambda m, i, o: rows.append(i[0].shape))
    kw = dict(seed=5, progress=False, batch_size=8, lr=3e-3)
    h = FastTrainer(ours, strategies=[Unpad(), MixedPrecision("bf16")], **kw).fit(data, 3)
    h_ref = FastTrainer(ref, **kw).fit(data, 3)
    assert all(len(s) == 2 and s[0] % 32 == 0 for s in rows[1:])  # packed, rows rounded up to 32 under autocast
    assert h.losses[-1] == pytest.approx(h_ref.losses[-1], rel=0.03)


@pytestmark_torch_layers
def test_a_torch_transformer_that_lets_padding_leak_is_refused():
    """Without memory_key_padding_mask the decoder reads padded memory: packing would change real outputs."""
    model = TorchSeq2Seq(memory_mask=False)
    before = [p.detach().clone() for p in model.parameters()]
    t = FastTrainer(model, strategies=[Unpad()], progress=False)
    with pytest.raises(ValueError, match="Unpad refused this model on its first batch.*padding reach real positions"):
        t.fit(padded(), 1, batch_size=8)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    assert all("forward" not in vars(m) for m in model.modules())  # restored on the error too


@pytestmark_torch_layers
def test_torch_layers_that_packing_cannot_reproduce_are_refused_when_the_trainer_is_built():
    from hlbd_fast import GradientCheckpointing

    model = TorchSeq2Seq()
    model.transformer.encoder.layers[1].self_attn = nn.MultiheadAttention(16, 2, add_bias_kv=True, batch_first=True)
    with pytest.raises(ValueError, match="cannot pack layer 'transformer.encoder.layers.1'.*add_bias_kv=True"):
        FastTrainer(model, strategies=[Unpad()], progress=False)
    with pytest.raises(StrategyConflictError, match="Unpad.*cannot run with GradientCheckpointing.*replacing their forward"):
        FastTrainer(TorchSeq2Seq(), strategies=[Unpad(), GradientCheckpointing()], progress=False)


def test_the_preset_keeps_unpad_for_torch_transformers():
    t = FastTrainer.from_preset(TorchSeq2Seq(), "fastest", device="cpu", progress=False)
    assert isinstance(t.roles.forward, Unpad) and t.roles.forward.mode == "layers"


def test_low_precision_attention_without_dropout_runs_in_fp32_on_cpu():
    """torch's CPU flash kernel is slow in bf16: the model attends in fp32 and casts back."""
    from hlbd_fast.models.transformer import attention

    q, k, v = (torch.randn(3, 2, 5, 8) for _ in range(3))
    keep = torch.rand(3, 1, 1, 5) > 0.3
    keep[..., 0] = True
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    got = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), keep)
    assert got.dtype == torch.bfloat16
    exact_inputs = F.scaled_dot_product_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), attn_mask=keep)
    assert torch.equal(got, exact_inputs.bfloat16())  # fp32 arithmetic on the bf16 inputs, rounded once
    assert rel_diff(got.float(), want) < 2e-2
    assert torch.equal(attention(q, k, v, keep), want)  # fp32: SDPA itself


@pytestmark_torch_layers
def test_packed_layers_in_a_hand_written_loop():
    from hlbd_fast.strategies.unpad_layers import packed_layers

    model = TorchSeq2Seq(batch_first=False).eval()
    src, tgt = padded(n=8)
    real = tgt[:, 1:].ne(0)
    with torch.enable_grad():
        full = model(src, tgt[:, :-1])
        with packed_layers(model) as packer:
            assert len(packer.layers) == 4 and packer.enabled
            packed = model(src, tgt[:, :-1])
            with packed_layers(model) as inner:  # re-entrant: the packer in force
                assert inner is packer
            assert "forward" in vars(model.transformer.encoder.layers[0])  # still packed after the inner exit
    assert rel_diff(packed[real].detach(), full[real].detach()) < 1e-5
    assert all("forward" not in vars(m) for m in model.modules())


def _eval_syncs(trainer, data) -> dict[str, int]:
    """The doctor's sync counter around one evaluation: operator -> count (on a CPU: what would wait for a GPU)."""
    from hlbd_fast.doctor.probe import Probe, SyncCounter

    probe = Probe()
    probe.phase, probe.mode, probe.recording = "forward", "sync", True
    with SyncCounter(probe).active(dispatch=True):
        trainer.evaluate(data)
    return {op: n for (_, op), n in probe.syncs.items()}


def test_evaluation_packs_from_host_sizes_with_no_read_back_per_batch():
    """Tensors to evaluate are measured once on the host: twice the batches, no more syncs (a Dataset's batches still
    count theirs: two per batch)."""
    torch.manual_seed(0)
    model = Seq2SeqTransformer(vocab_size=23, d_model=16, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, d_ff=32, dropout=0.0, max_length=32)
    t = FastTrainer(model, strategies=[Unpad()], progress=False, batch_size=8)
    for n in (16, 64):  # 2 or 8 batches: at most the one-off measurement on the host
        assert _eval_syncs(t, padded(n=n)).get("aten::nonzero", 0) <= 2
    ds = _eval_syncs(t, torch.utils.data.TensorDataset(*padded(n=64)))
    assert ds["aten::nonzero"] == 2 * 8
    plain = FastTrainer(clone(model), progress=False, batch_size=8)
    assert t.evaluate(padded(n=64))["loss"] == pytest.approx(plain.evaluate(padded(n=64))["loss"], rel=1e-6)
