"""Where the real tokens of a padded batch are: pack ``[B, L, ...]`` to ``[N, ...]`` and back.

A :class:`Packing` describes one side of a batch (the sources, or the decoder inputs):
which of its ``B x L`` positions hold real tokens. Position-wise work (embeddings,
projections, feed-forward, layer norms, the output head, the loss) runs on the packed
``[N, D]`` rows; attention unpacks to ``[B, L, D]`` (zeros at padded positions, which a
key mask or causality keeps out of every real position) and packs its output again.

A packing may round its row count up to a multiple (``multiple_of``): the packed tensors
then end with filler rows (copies of the first real position) that attention never reads
and the loss ignores (their targets are padding). A few distinct shapes let kernels that
are compiled per shape (oneDNN's bf16 matrix products on CPUs) stay cached.

This is the protocol of :class:`~hlbd_fast.strategies.Unpad`: a model opts in by
accepting ``unpad=UnpadBatch(...)`` in its ``forward`` and returning logits for the
packed target positions only (see :class:`~hlbd_fast.models.Seq2SeqTransformer`).

Host syncs: a packing's row count is the number of real positions. Found on the device
(``nonzero``), it is read back: one sync per packing on a GPU. Given it from the host
(``tokens=``, ``sizes=``; :func:`packed_sizes` computes them per row, as
:class:`~hlbd_fast.strategies.DevicePreload` does once for its data), the packing is built
on the device without reading anything back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validation import check_positive_int

__all__ = ["Packing", "UnpadBatch", "mask_packing", "packed_sizes", "source_packing", "target_packing"]


@dataclass(frozen=True)
class Packing:
    """The real positions of a ``[B, L]`` token batch, row-major, then any filler rows."""

    rows: int  # B
    width: int  # L: the padded width the packing was made for
    index: torch.Tensor  # [length] int64: flat positions b * L + i of the real tokens, in order, then fillers
    positions: torch.Tensor  # [length] int64: i, each packed row's column (its position id)
    key_mask: torch.Tensor  # [B, 1, 1, L] bool: True at real positions (an attention key mask)
    tokens: int = -1  # N, the real positions (the first N packed rows); -1: all of ``index``

    def __post_init__(self) -> None:
        if self.tokens < 0:
            object.__setattr__(self, "tokens", int(self.index.shape[0]))

    @property
    def length(self) -> int:
        """Rows of a packed tensor: ``tokens`` real rows, then filler rows up to the packing's multiple."""
        return int(self.index.shape[0])

    def pack(self, x: torch.Tensor, fill: float | None = None) -> torch.Tensor:
        """``[B, L, ...]`` -> ``[length, ...]``: the rows of the real positions, then the filler rows.

        Filler rows repeat the first real position; ``fill`` (for example ``pad_id`` for
        targets, so that the loss ignores them) overwrites them.
        """
        out = x.reshape(self.rows * self.width, *x.shape[2:]).index_select(0, self.index)
        if fill is not None and self.length > self.tokens:
            out[self.tokens :] = fill
        return out

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        """``[length, ...]`` -> ``[B, L, ...]``: real rows in place, zeros at padded positions, fillers dropped."""
        index, n = self.index, self.tokens
        if n < self.length:
            index, y = index[:n], y[:n]
        out = y.new_zeros(self.rows * self.width, *y.shape[1:])
        out = out.index_copy(0, index, y)
        return out.view(self.rows, self.width, *y.shape[1:])


def mask_packing(keep: torch.Tensor, multiple_of: int = 1) -> Packing:
    """The packing of the True positions of a ``[B, L]`` bool mask, rows rounded up to ``multiple_of``."""
    check_positive_int("multiple_of", multiple_of, "mask_packing")
    return _packing(keep, multiple_of)


def _true_positions(keep: torch.Tensor, n: int) -> torch.Tensor:
    """The flat positions of the ``n`` True entries of ``keep``, in order, with nothing read back.

    Each True entry's running count is its slot in the result; the False entries all go to a
    spare slot ``n``, which is cut off. ``n`` must be the true count, known on the host.
    """
    flat = keep.reshape(-1)
    slot = torch.where(flat, flat.cumsum(0) - 1, n)
    out = torch.zeros(n + 1, dtype=torch.long, device=keep.device)
    out.scatter_(0, slot, torch.arange(flat.shape[0], device=keep.device))
    return out[:n]


def _packing(keep: torch.Tensor, multiple_of: int, tokens: int | None = None) -> Packing:
    rows, width = keep.shape
    if tokens is None:
        index = keep.reshape(-1).nonzero().squeeze(1)  # data-dependent size: a host sync on a GPU
    else:
        index = _true_positions(keep, tokens)  # the size known on the host: no sync
    n = int(index.shape[0])
    fillers = -n % multiple_of if n else 0
    if fillers:
        index = torch.cat([index, index[:1].expand(fillers)])
    return Packing(rows, width, index, index % width, keep[:, None, None, :], n)


def _scored_lengths(tgt_out: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Per row of ``tgt_out``: its last non-pad position plus one (0 for a row of padding only)."""
    pos = torch.arange(1, tgt_out.shape[1] + 1, device=tgt_out.device)
    return (tgt_out.ne(pad_id) * pos).amax(dim=1)


def source_packing(src: torch.Tensor, pad_id: int, multiple_of: int = 1, tokens: int | None = None) -> Packing:
    """The non-pad source tokens; a row that is all padding keeps its first position.

    That is what a model that masks source padding attends to: its real keys (and, for an
    all-padding row, position 0, so attention stays defined). ``multiple_of`` rounds the
    packed rows up with filler rows. ``tokens``: how many positions that keeps, when known
    on the host (see :func:`packed_sizes`): then nothing is read back.
    """
    check_positive_int("multiple_of", multiple_of, "source_packing")
    keep = src.ne(pad_id)
    keep[:, 0] |= ~keep.any(dim=1)
    return _packing(keep, multiple_of, tokens)


def target_packing(tgt_out: torch.Tensor, pad_id: int, multiple_of: int = 1, tokens: int | None = None) -> Packing:
    """The decoder positions whose output is scored: up to each row's last non-pad target.

    With right padding and causal self-attention these positions see only each other, so
    running the decoder on them alone gives their logits exactly (up to float rounding).
    ``multiple_of`` rounds the packed rows up with filler rows. ``tokens``: how many
    positions that keeps, when known on the host (see :func:`packed_sizes`).
    """
    check_positive_int("multiple_of", multiple_of, "target_packing")
    length = _scored_lengths(tgt_out, pad_id)[:, None]
    return _packing(torch.arange(tgt_out.shape[1], device=tgt_out.device) < length, multiple_of, tokens)


def packed_sizes(src: torch.Tensor, tgt: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a ``(src, tgt)`` batch: the source positions and the decoder positions :meth:`UnpadBatch.of` packs.

    A source row keeps its non-pad tokens (a row of padding only, its first position); a
    target row is scored up to its last non-pad target (``tgt[:, 1:]``). Summed over the rows
    of a micro-batch they are the ``sizes`` that let :meth:`UnpadBatch.of` pack it without
    reading anything back. Cutting all-padding columns changes neither. Computed where the
    tensors are: compute them on the host (:class:`~hlbd_fast.strategies.DevicePreload` does,
    once for its data).
    """
    return src.ne(pad_id).sum(dim=1).clamp(min=1), _scored_lengths(tgt[:, 1:], pad_id)


@dataclass(frozen=True)
class UnpadBatch:
    """What ``model(src, tgt_in, unpad=...)`` receives: the packings of both sides."""

    source: Packing  # of ``src``
    target: Packing  # of ``tgt_in`` (the decoder inputs whose outputs are scored)

    @classmethod
    def of(cls, src: torch.Tensor, tgt: torch.Tensor, pad_id: int, multiple_of: int = 1, sizes: tuple[int, int] | None = None) -> "UnpadBatch":
        """The packings of a ``(src, tgt)`` batch (``tgt`` = ``BOS ... EOS PAD...``), rows rounded up to ``multiple_of``.

        ``sizes``: the source and target positions packed (the sums of :func:`packed_sizes` over
        the batch's rows), when known on the host: the packings are then built without a host
        sync. ``None``: they are counted on the device and read back (two syncs on a GPU).
        """
        ns, nt = (None, None) if sizes is None else sizes
        return cls(source_packing(src, pad_id, multiple_of, ns), target_packing(tgt[:, 1:], pad_id, multiple_of, nt))

    def targets(self, tgt: torch.Tensor, pad_id: int) -> torch.Tensor:
        """The packed targets ``[length]`` of ``tgt`` (``tgt[:, 1:]``, filler rows set to ``pad_id``)."""
        return self.target.pack(tgt[:, 1:], fill=pad_id)
