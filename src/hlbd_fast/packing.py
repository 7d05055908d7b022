"""Where the real tokens of a padded batch are: pack ``[B, L, ...]`` to ``[N, ...]`` and back.

A :class:`Packing` describes one side of a batch (the sources, or the decoder inputs):
which of its ``B x L`` positions hold real tokens. Position-wise work (embeddings,
projections, feed-forward, layer norms, the output head, the loss) runs on the packed
``[N, D]`` rows; attention unpacks to ``[B, L, D]`` (zeros at padded positions, which a
key mask or causality keeps out of every real position) and packs its output again.

This is the protocol of :class:`~hlbd_fast.strategies.Unpad`: a model opts in by
accepting ``unpad=UnpadBatch(...)`` in its ``forward`` and returning logits for the
packed target positions only (see :class:`~hlbd_fast.models.Seq2SeqTransformer`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Packing", "UnpadBatch", "source_packing", "target_packing"]


@dataclass(frozen=True)
class Packing:
    """The real positions of a ``[B, L]`` token batch, row-major."""

    rows: int  # B
    width: int  # L: the padded width the packing was made for
    index: torch.Tensor  # [N] int64: flat positions b * L + i of the real tokens, in order
    positions: torch.Tensor  # [N] int64: i, each real token's column (its position id)
    key_mask: torch.Tensor  # [B, 1, 1, L] bool: True at real positions (an attention key mask)

    @property
    def tokens(self) -> int:
        """N, the number of real positions."""
        return int(self.index.shape[0])

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, ...]`` -> ``[N, ...]``: the rows of the real positions."""
        return x.reshape(self.rows * self.width, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        """``[N, ...]`` -> ``[B, L, ...]`` with zeros at the padded positions."""
        out = y.new_zeros(self.rows * self.width, *y.shape[1:])
        out = out.index_copy(0, self.index, y)
        return out.view(self.rows, self.width, *y.shape[1:])


def _packing(keep: torch.Tensor) -> Packing:
    rows, width = keep.shape
    index = keep.reshape(-1).nonzero().squeeze(1)  # data-dependent size: a host sync on a GPU
    return Packing(rows, width, index, index % width, keep[:, None, None, :])


def source_packing(src: torch.Tensor, pad_id: int) -> Packing:
    """The non-pad source tokens; a row that is all padding keeps its first position.

    That is what a model that masks source padding attends to: its real keys (and, for an
    all-padding row, position 0, so attention stays defined).
    """
    keep = src.ne(pad_id)
    keep[:, 0] |= ~keep.any(dim=1)
    return _packing(keep)


def target_packing(tgt_out: torch.Tensor, pad_id: int) -> Packing:
    """The decoder positions whose output is scored: up to each row's last non-pad target.

    With right padding and causal self-attention these positions see only each other, so
    running the decoder on them alone gives their logits exactly (up to float rounding).
    """
    pos = torch.arange(1, tgt_out.shape[1] + 1, device=tgt_out.device)
    length = (tgt_out.ne(pad_id) * pos).amax(dim=1, keepdim=True)
    return _packing(torch.arange(tgt_out.shape[1], device=tgt_out.device) < length)


@dataclass(frozen=True)
class UnpadBatch:
    """What ``model(src, tgt_in, unpad=...)`` receives: the packings of both sides."""

    source: Packing  # of ``src``
    target: Packing  # of ``tgt_in`` (the decoder inputs whose outputs are scored)

    @classmethod
    def of(cls, src: torch.Tensor, tgt: torch.Tensor, pad_id: int) -> "UnpadBatch":
        """The packings of a ``(src, tgt)`` batch (``tgt`` = ``BOS ... EOS PAD...``)."""
        return cls(source_packing(src, pad_id), target_packing(tgt[:, 1:], pad_id))
