"""Shared fixtures: a tiny seq2seq model that masks padding, and ragged token data."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

PAD = 0


class TinySeq2Seq(nn.Module):
    """A small GRU encoder-decoder that ignores padded source positions (causal decoder)."""

    def __init__(self, vocab_size: int = 23, d: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.emb = nn.Embedding(vocab_size, d)
        self.drop = nn.Dropout(dropout)
        self.rnn = nn.GRU(d, d, batch_first=True)
        self.out = nn.Linear(d, vocab_size)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        mask = (src != PAD).unsqueeze(-1).float()
        ctx = (self.emb(src) * mask).sum(1) / mask.sum(1).clamp(min=1)
        h, _ = self.rnn(self.drop(self.emb(tgt_in)), ctx.unsqueeze(0).contiguous())
        return self.out(h)


class TorchSeq2Seq(nn.Module):
    """An encoder-decoder on nn.Transformer that passes key padding masks, as tutorials write it."""

    def __init__(self, dropout: float = 0.0, batch_first: bool = True, norm_first: bool = False, memory_mask: bool = True, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.batch_first, self.memory_mask, self.vocab_size = batch_first, memory_mask, 23
        self.embed, self.pos = nn.Embedding(23, 16), nn.Embedding(32, 16)
        self.transformer = nn.Transformer(16, 2, 2, 2, 32, dropout, batch_first=batch_first, norm_first=norm_first, activation="gelu")
        self.head = nn.Linear(16, 23)

    def _emb(self, x):
        e = self.embed(x) + self.pos(torch.arange(x.shape[1]))
        return e if self.batch_first else e.transpose(0, 1)

    def forward(self, src, tgt_in):
        causal = nn.Transformer.generate_square_subsequent_mask(tgt_in.shape[1])
        h = self.transformer(
            self._emb(src),
            self._emb(tgt_in),
            tgt_mask=causal,
            src_key_padding_mask=src.eq(0),
            tgt_key_padding_mask=tgt_in.eq(0),
            tgt_is_causal=True,
            memory_key_padding_mask=src.eq(0) if self.memory_mask else None,
        )
        return self.head(h if self.batch_first else h.transpose(0, 1))


def ragged_pairs(n: int = 40, vocab: int = 23, src_len: int = 10, tgt_len: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` pairs with random lengths, right-padded with 0; targets start with id 2 (bos)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.zeros(n, src_len, dtype=torch.long)
    tgt = torch.zeros(n, tgt_len, dtype=torch.long)
    for i in range(n):
        ls = int(torch.randint(2, src_len + 1, (1,), generator=g))
        lt = int(torch.randint(3, tgt_len + 1, (1,), generator=g))
        src[i, :ls] = torch.randint(4, vocab, (ls,), generator=g)
        tgt[i, 0] = 2
        tgt[i, 1:lt] = torch.randint(4, vocab, (lt - 1,), generator=g)
    return src, tgt


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and spinning threads on a shared
    2-core machine cost up to 10x; one thread also keeps CPU results repeatable."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_model() -> TinySeq2Seq:
    torch.manual_seed(0)
    return TinySeq2Seq()


@pytest.fixture
def pairs() -> tuple[torch.Tensor, torch.Tensor]:
    return ragged_pairs()


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def max_rel_diff(a: nn.Module, b: nn.Module) -> float:
    """Largest |a - b| / max(|a|) over all parameters."""
    worst = 0.0
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        scale = pa.detach().abs().max().clamp(min=1e-12)
        worst = max(worst, float((pa.detach() - pb.detach()).abs().max() / scale))
    return worst
