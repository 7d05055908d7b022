"""Tests for hlbd_fast.models.Seq2SeqTransformer (CPU, tiny configurations)."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hlbd_fast.data import BOS_ID, EOS_ID, PAD_ID, CharTokenizer, encode_pairs
from hlbd_fast.models import ModelConfig, Seq2SeqTransformer, build_model

TINY = dict(
    vocab_size=50,
    d_model=32,
    n_encoder_layers=1,
    n_decoder_layers=1,
    n_heads=4,
    d_ff=64,
    dropout=0.0,
    max_length=64,
)


def tiny(**overrides: object) -> Seq2SeqTransformer:
    torch.manual_seed(0)
    return Seq2SeqTransformer(**{**TINY, **overrides})


def padded_batch(
    b: int = 4,
    length: int = 64,
    src_lens: tuple[int, ...] = (7, 3, 10, 5),
    tgt_lens: tuple[int, ...] = (9, 4, 6, 12),
    vocab: int = 50,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random token batch."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (b, length), generator=g)
    tgt = torch.randint(4, vocab, (b, length), generator=g)
    for i in range(b):
        src[i, src_lens[i] :] = PAD_ID
        tgt[i, tgt_lens[i] :] = PAD_ID
        tgt[i, 0] = BOS_ID
    return src, tgt


# ------------------------------------------------------------------ basics
def test_default_config_is_the_hlbd_setup() -> None:
    cfg = ModelConfig()
    assert (cfg.vocab_size, cfg.d_model, cfg.n_encoder_layers, cfg.n_decoder_layers, cfg.n_heads, cfg.d_ff, cfg.dropout, cfg.max_length, cfg.pad_id) == (
        5000,
        256,
        3,
        3,
        8,
        1024,
        0.1,
        64,
        0,
    )
    m = Seq2SeqTransformer()
    assert m.vocab_size == 5000 and m.pad_id == 0 and m.max_length == 64
    assert isinstance(m.encoder_layers, nn.ModuleList) and len(m.encoder_layers) == 3
    assert isinstance(m.decoder_layers, nn.ModuleList) and len(m.decoder_layers) == 3
    assert m.embed.weight.shape == (5000, 256)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 3  # type: ignore[misc]  # frozen
    m2 = Seq2SeqTransformer(cfg, d_model=64, n_heads=4)
    assert m2.config.d_model == 64 and m2.config.vocab_size == 5000


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="d_model=30 must be divisible by n_heads=4"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(dropout=1.0)
    with pytest.raises(ValueError, match="pad_id"):
        ModelConfig(vocab_size=10, pad_id=10)
    with pytest.raises(TypeError):
        Seq2SeqTransformer(not_a_field=1)
    with pytest.raises(TypeError, match="ModelConfig"):
        Seq2SeqTransformer({"d_model": 8})  # type: ignore[arg-type]


def test_forward_shapes_and_tied_weights() -> None:
    m = tiny()
    src, tgt = padded_batch(length=20)
    logits = m(src, tgt[:, :15])
    assert logits.shape == (4, 15, 50) and logits.dtype == torch.float32
    assert m.lm_head.weight is m.embed.weight
    n_embed = sum(1 for p in m.parameters() if p.shape == (50, 32))
    assert n_embed == 1, "one shared embedding Parameter"
    logits.sum().backward()
    assert m.embed.weight.grad is not None


def test_build_model_from_tokenizer() -> None:
    tok = CharTokenizer.from_texts(["abc"], vocab_size=77)
    m = build_model(tok, d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1, n_decoder_layers=1)
    assert m.vocab_size == 77 and m.pad_id == PAD_ID
    assert build_model(33, d_model=16, n_heads=2).vocab_size == 33
    with pytest.raises(ValueError, match="tokenizer_or_vocab_size"):
        build_model("big")


def test_all_padding_source_row_is_finite() -> None:
    for train in (False, True):
        m = tiny(dropout=0.1)
        m.train(train)
        src, tgt = padded_batch(length=12, src_lens=(0, 3, 0, 12))
        logits = m(src, tgt)
        assert torch.isfinite(logits).all()
        logits.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_trailing_padding_trim_invariance() -> None:
    m = tiny(n_encoder_layers=2, n_decoder_layers=2).eval()
    src, tgt = padded_batch(length=64)
    s_len, t_len = 10, 12  # longest real source/target in the batch
    with torch.no_grad():
        full = m(src, tgt)
        trimmed = m(src[:, :s_len], tgt[:, :t_len])
    assert (full[:, :t_len] - trimmed).abs().max().item() < 1e-5
    for i, n in enumerate((9, 4, 6, 12)):  # real positions of each row
        assert (full[i, :n] - trimmed[i, :n]).abs().max().item() < 1e-5


def test_bad_inputs() -> None:
    m = tiny(max_length=16)
    src, tgt = padded_batch(length=16)
    with pytest.raises(ValueError, match="src must be 2-D"):
        m(src[0], tgt)
    with pytest.raises(ValueError, match=r"tgt must hold integer token ids.*float32"):
        m(src, tgt.float())
    with pytest.raises(ValueError, match="src must be a torch.Tensor"):
        m(src.tolist(), tgt)
    long_src = torch.ones(4, 20, dtype=torch.long)
    with pytest.raises(ValueError, match="src has length 20.*max_length=16"):
        m(long_src, tgt)
    with pytest.raises(ValueError, match="tgt has length 17.*max_length=16"):
        m(src, torch.ones(4, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="batch sizes differ: 4 vs 2"):
        m(src, tgt[:2])
    with pytest.raises(ValueError, match="src has length 20.*max_length=16"):
        m.check_inputs(long_src, tgt)
    m.check_inputs(src, tgt)
    with pytest.raises(ValueError, match="max_new_tokens=16"):
        m.generate(src, max_new_tokens=16)
    with pytest.raises(ValueError, match="temperature"):
        m.generate(src, max_new_tokens=4, greedy=False, temperature=0.0)


def test_layers_can_be_checkpointed() -> None:
    m = tiny(n_encoder_layers=2, n_decoder_layers=2)
    src, tgt = padded_batch(length=16)
    ref = m(src, tgt)
    ref.square().mean().backward()
    ref_grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()

    class Ckpt(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return checkpoint(self.inner, *args, use_reentrant=False)

    for layers in (m.encoder_layers, m.decoder_layers):
        for i in range(len(layers)):
            layers[i] = Ckpt(layers[i])
    out = m(src, tgt)
    out.square().mean().backward()
    assert torch.allclose(out, ref)
    for p, g in zip(m.parameters(), ref_grads):
        assert torch.allclose(p.grad, g, atol=1e-6)


# ----------------------------------------------------------------- compile
def test_no_graph_breaks() -> None:
    """No host sync / data-dependent branch in forward: dynamo sees one graph."""
    torch._dynamo.reset()
    for train in (False, True):
        m = tiny(dropout=0.1).train(train)
        src, tgt = padded_batch(length=16)
        explanation = torch._dynamo.explain(m)(src, tgt)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


def _compiled_matches_eager(backend: str) -> None:
    torch._dynamo.reset()
    m = tiny()
    src, tgt = padded_batch(length=16)
    ref = m(src, tgt)
    ref.sum().backward()
    ref_grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    compiled = torch.compile(m, fullgraph=True, backend=backend)
    out = compiled(src, tgt)
    out.sum().backward()
    assert (out - ref).abs().max().item() < 1e-5
    for p, g in zip(m.parameters(), ref_grads):
        err = ((p.grad - g).abs() / (g.abs() + 1.0)).max().item()
        assert err < 1e-4, err


def test_compile_fullgraph_eager_backend() -> None:
    _compiled_matches_eager("eager")


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="inductor on CPU needs a C++ compiler (g++), none found on PATH",
)
def test_compile_fullgraph_inductor() -> None:
    """Default backend on CPU: ~5 s with a warm inductor cache, ~1 min cold on 2 cores."""
    _compiled_matches_eager("inductor")


# ---------------------------------------------------------------- training
TRAIN_PAIRS = [
    ("🌧️", "下雨了。"),
    ("下雨", "下雨了。"),
    ("❤️", "我爱你。"),
    ("I love you", "我爱你。"),
    ("愛してる", "我爱你。"),
    ("사랑해", "我爱你。"),
    ("☀️", "太阳出来了。"),
    ("cat", "小猫睡觉。"),
]


def test_short_training_learns_and_generates() -> None:
    torch.manual_seed(0)
    tok = CharTokenizer.from_pairs(TRAIN_PAIRS)
    src, tgt = encode_pairs(TRAIN_PAIRS, tok, max_length=12)
    m = build_model(tok, d_model=64, n_heads=4, d_ff=128, n_encoder_layers=2, n_decoder_layers=2, dropout=0.0, max_length=12)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        logits = m(src, tgt[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, m.vocab_size), tgt[:, 1:].reshape(-1), ignore_index=PAD_ID)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 < losses[0] / 20, (losses[0], losses[-1])

    m.train()
    out = m.generate(src, max_new_tokens=11, bos_id=BOS_ID, eos_id=EOS_ID)
    assert m.training, "generate restores the training mode"
    assert out.dtype == torch.long and out.shape[0] == 8 and out.shape[1] <= 11
    decoded = [tok.decode(row) for row in out]
    assert decoded == [t for _, t in TRAIN_PAIRS]
    # each row ends with EOS, then padding
    for row, (_, t) in zip(out.tolist(), TRAIN_PAIRS):
        assert row[len(t)] == EOS_ID and all(x == PAD_ID for x in row[len(t) + 1 :])

    g = torch.Generator().manual_seed(0)
    sampled = m.generate(src[:2], max_new_tokens=5, greedy=False, temperature=0.7, generator=g)
    assert sampled.shape[0] == 2 and sampled.shape[1] <= 5
