"""GradientCheckpointing: same losses and gradients, less saved activation memory, same state_dict."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TinySeq2Seq, clone, ragged_pairs
from torch import nn

from hlbd_fast import FastTrainer, StrategyConflictError
from hlbd_fast.models import DecoderLayer, EncoderLayer, Seq2SeqTransformer
from hlbd_fast.strategies.checkpointing import GradientCheckpointing, checkpoint_modules, is_checkpointed

VOCAB = 50


def tiny_transformer(seed: int = 0, dropout: float = 0.0, layers: int = 2) -> Seq2SeqTransformer:
    torch.manual_seed(seed)
    return Seq2SeqTransformer(
        vocab_size=VOCAB, d_model=32, n_encoder_layers=layers, n_decoder_layers=layers, n_heads=2, d_ff=64, dropout=dropout, max_length=16
    )


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return ragged_pairs(n=48, vocab=VOCAB)


def grads_of_one_step(model: nn.Module, data) -> dict[str, torch.Tensor]:
    src, tgt = data[0][:16], data[1][:16]
    model.train()
    logits = model(src, tgt[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tgt[:, 1:].reshape(-1), ignore_index=0)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_same_losses_gradients_and_weights(data, dropout):
    """Dropout off and on: checkpointed training equals plain training (recomputation replays the RNG)."""
    base = tiny_transformer(dropout=dropout)
    a, b = clone(base), clone(base)
    torch.manual_seed(11)
    ga = grads_of_one_step(a, data)
    checkpoint_modules(b)
    torch.manual_seed(11)
    gb = grads_of_one_step(b, data)
    assert ga.keys() == gb.keys()
    for n in ga:
        assert torch.allclose(ga[n], gb[n], rtol=0, atol=1e-6), n

    a, b = clone(base), clone(base)
    ha = FastTrainer(a, seed=2, lr=2e-3, progress=False).fit(data, 2, batch_size=8)
    tb = FastTrainer(b, strategies=[GradientCheckpointing()], seed=2, lr=2e-3, progress=False)
    hb = tb.fit(data, 2, batch_size=8)
    assert tb.strategies[0].checkpointed == ["encoder_layers.0", "encoder_layers.1", "decoder_layers.0", "decoder_layers.1"]
    assert hb.losses == pytest.approx(ha.losses, rel=1e-6)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-6), n
    assert not torch.equal(a.embed.weight, base.embed.weight)  # it trained


def count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    # a pre-hook: the recomputation stops as soon as it has what backward needs
    module.register_forward_pre_hook(lambda m, i: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_layers_are_recomputed_only_when_training_with_grad(data):
    m = tiny_transformer()
    checkpoint_modules(m)
    calls = count_calls(m.encoder_layers[0].ff)  # a submodule: runs again when the layer is recomputed
    src, tgt = data[0][:4], data[1][:4, :-1]
    m(src, tgt).sum().backward()
    assert calls[0] == 2  # forward + recomputation in backward
    with torch.no_grad():
        m(src, tgt)
    assert calls[0] == 3
    m.eval()
    m(src, tgt).sum().backward()
    assert calls[0] == 4


def saved_bytes(model: nn.Module, data) -> int:
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(data[0][:16], data[1][:16, :-1]).sum()
    return total[0]


def test_less_activation_memory_is_saved(data):
    plain = tiny_transformer()
    ckpt = clone(plain)
    checkpoint_modules(ckpt)
    before, after = saved_bytes(plain, data), saved_bytes(ckpt, data)
    assert after < 0.5 * before


def test_state_dict_keys_unchanged_and_interchangeable(data):
    plain = tiny_transformer()
    ckpt = tiny_transformer(seed=1)
    keys = list(ckpt.state_dict())
    GradientCheckpointing().wrap_model(None, ckpt)
    assert list(ckpt.state_dict()) == keys == list(plain.state_dict())
    ckpt.load_state_dict(plain.state_dict())  # strict: same keys both ways
    plain.load_state_dict(ckpt.state_dict())
    with torch.no_grad():
        assert torch.equal(ckpt(data[0][:4], data[1][:4]), plain(data[0][:4], data[1][:4]))


def test_no_double_wrapping():
    m = tiny_transformer()
    first = checkpoint_modules(m)
    inner = m.encoder_layers[0]._hlbd_checkpoint_inner
    second = checkpoint_modules(m)
    assert first == second
    assert m.encoder_layers[0]._hlbd_checkpoint_inner is not None
    assert m.encoder_layers[0]._hlbd_checkpoint_inner == inner  # still the layer's own forward
    assert inner.__func__ is EncoderLayer.forward
    # and through two trainers on one model (two in one trainer replace the same layers' forward: refused)
    FastTrainer(m, strategies=[GradientCheckpointing()], progress=False)
    FastTrainer(m, strategies=[GradientCheckpointing()], progress=False)
    with pytest.raises(StrategyConflictError, match="GradientCheckpointing.*cannot run with GradientCheckpointing"):
        FastTrainer(m, strategies=[GradientCheckpointing(), GradientCheckpointing()], progress=False)
    assert m.encoder_layers[0]._hlbd_checkpoint_inner.__func__ is EncoderLayer.forward


def test_deepcopy_computes_with_its_own_weights(data):
    m = tiny_transformer()
    checkpoint_modules(m)
    c = copy.deepcopy(m)
    assert is_checkpointed(c.decoder_layers[0])
    assert c.decoder_layers[0].forward.__self__ is c.decoder_layers[0]
    with torch.no_grad():
        for p in c.decoder_layers[0].parameters():
            p.add_(0.5)
    src, tgt = data[0][:4], data[1][:4]
    assert not torch.allclose(c(src, tgt), m(src, tgt))


def test_select_by_class_or_name():
    m = tiny_transformer()
    assert checkpoint_modules(m, [DecoderLayer]) == ["decoder_layers.0", "decoder_layers.1"]
    assert not is_checkpointed(m.encoder_layers[0])
    m = tiny_transformer()
    s = GradientCheckpointing(modules="EncoderLayer")
    s.wrap_model(None, m)
    assert s.checkpointed == ["encoder_layers.0", "encoder_layers.1"]
    assert repr(s) == "GradientCheckpointing(modules=['EncoderLayer'], checkpointed=['encoder_layers.0', 'encoder_layers.1'])"


def test_nested_lists_are_not_checkpointed_twice():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.parts = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

        def forward(self, x):
            for p in self.parts:
                x = p(x)
            return x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])
            self.groups = nn.ModuleList([nn.ModuleList([nn.Linear(4, 4)])])

    net = Net()
    assert checkpoint_modules(net) == ["blocks.0", "blocks.1", "groups.0.0"]
    assert not is_checkpointed(net.blocks[0].parts[0])


def test_nothing_matched_is_an_error_naming_the_search():
    with pytest.raises(ValueError, match="no nn.ModuleList in TinySeq2Seq.*modules=\\[MyLayer\\]"):
        FastTrainer(TinySeq2Seq(), strategies=[GradientCheckpointing()], progress=False)
    with pytest.raises(ValueError, match=r"modules=\['GRUCell'\]\) matched no submodule.*'GRU'"):
        FastTrainer(TinySeq2Seq(), strategies=[GradientCheckpointing(modules=["GRUCell"])], progress=False)


@pytest.mark.parametrize("bad", [[], [int], [""], 3, [nn.Linear, 3.0]])
def test_bad_modules_argument(bad):
    with pytest.raises(ValueError, match="GradientCheckpointing\\(modules=.*nn.Module classes"):
        GradientCheckpointing(modules=bad)
