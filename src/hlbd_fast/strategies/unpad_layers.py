"""Unpad for models built from torch's own transformer layers, through module surgery.

A model made of ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (alone, or in
``nn.TransformerEncoder``, ``nn.TransformerDecoder`` or ``nn.Transformer``) that passes key
padding masks to them runs each layer on its real tokens only: while :func:`packed_layers` is
entered, every such layer packs its input ``[B, L, D]`` to the rows its key padding mask marks
real, runs its own forward on those ``[N, D]`` rows (layer norms, projections, feed-forward,
dropout and residuals are position-wise), and unpacks its output with zeros at the padded
positions. Its attention modules (``nn.MultiheadAttention``) project the packed rows and attend
per sequence, with the masks the layer passed, combined as ``nn.MultiheadAttention`` combines
them. The model's own embeddings and output head still see the padded batch.

A padded position is never read by a real one when each layer masks padded keys, so the real
positions' outputs are the padded model's up to float rounding; :func:`verify_layers` proves it
on a batch (``Unpad`` does, on the first one) and refuses a model whose real outputs change (for
example a decoder that does not pass ``memory_key_padding_mask``).
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..models.transformer import attention
from ..packing import Packing, mask_packing

__all__ = ["LayerPacker", "packable_layers", "check_layers", "packed_layers"]

_INNER = "_hlbd_unpad_inner"  # instance attribute: the forward a packed layer or attention wraps
_PACKINGS = "_hlbd_unpad_packings"  # on an attention module during its layer's call: (queries, keys)
_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def packable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` submodules of ``model``, by name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _LAYERS)]


def _attentions(layer: nn.Module) -> list[nn.MultiheadAttention]:
    names = ("self_attn", "multihead_attn") if isinstance(layer, nn.TransformerDecoderLayer) else ("self_attn",)
    return [getattr(layer, n) for n in names]


def check_layers(model: nn.Module) -> list[str]:
    """The names of ``model``'s packable layers, after checking that each can run packed.

    Raises:
        ValueError: an attention option that packing does not reproduce (separate key/value
            sizes, ``add_bias_kv``, ``add_zero_attn``), naming the layer.
    """
    names = []
    for name, layer in packable_layers(model):
        for attn in _attentions(layer):
            why = (
                "kdim/vdim differ from embed_dim"
                if not attn._qkv_same_embed_dim
                else "add_bias_kv=True"
                if attn.bias_k is not None
                else "add_zero_attn=True"
                if attn.add_zero_attn
                else None
            )
            if why is not None:
                raise ValueError(
                    f"Unpad cannot pack layer {name!r} of {type(model).__name__}: its nn.MultiheadAttention has {why}, "
                    "which packed attention does not reproduce; build the layer without it, or train without Unpad"
                )
        names.append(name)
    return names


# ---------------------------------------------------------------------------- masks
def _padding_of(mask: torch.Tensor) -> torch.Tensor:
    """Where a key padding mask (bool: True = padding; float: -inf = padding) marks padding, as bool."""
    return mask if mask.dtype == torch.bool else mask.isneginf()


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _attention_mask(
    attn_mask: torch.Tensor | None,
    key_padding: torch.Tensor | None,
    is_causal: bool,
    b: int,
    h: int,
    lq: int,
    lk: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """The mask ``nn.MultiheadAttention`` applies, shaped for ``[B, H, Lq, Lk]``: bool (True = attend) or additive."""
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(lq, lk, dtype=torch.bool, device=key_padding.device if key_padding is not None else None).triu_(1)
    if attn_mask is not None and attn_mask.dim() == 3:
        attn_mask = attn_mask.view(b, h, lq, lk)
    pad = None if key_padding is None else key_padding.view(b, 1, 1, lk)
    masks = [m for m in (attn_mask, pad) if m is not None]
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):  # nn.MultiheadAttention: True = not allowed
        blocked = masks[0] if len(masks) == 1 else masks[0] | masks[1]
        return ~blocked
    total = _additive(masks[0], dtype)
    return total if len(masks) == 1 else total + _additive(masks[1], dtype)


# ---------------------------------------------------------------------------- packed attention
def _packed_attention(
    attn: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, None]:
    """``nn.MultiheadAttention.forward`` on packed rows (installed on the instance while its layer runs packed)."""
    packings = getattr(attn, _PACKINGS, None)
    if packings is None:  # called outside a packed layer: the module as it is
        return getattr(attn, _INNER)(
            query,
            key,
            value,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
    pq, pk = packings
    d, h = attn.embed_dim, attn.num_heads
    w, bias = attn.in_proj_weight, attn.in_proj_bias
    if query is key and key is value:  # self-attention: one projection of the packed rows
        q, k, v = pq.unpack(F.linear(query, w, bias)).chunk(3, dim=-1)
    elif key is value:  # cross-attention: the queries, then one projection of the memory
        q = pq.unpack(F.linear(query, w[:d], None if bias is None else bias[:d]))
        k, v = pk.unpack(F.linear(key, w[d:], None if bias is None else bias[d:])).chunk(2, dim=-1)
    else:
        q, k, v = (
            packing.unpack(F.linear(x, w[i * d : (i + 1) * d], None if bias is None else bias[i * d : (i + 1) * d]))
            for i, (x, packing) in enumerate(((query, pq), (key, pk), (value, pk)))
        )
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    heads = [t.reshape(b, t.shape[1], h, d // h).transpose(1, 2) for t in (q, k, v)]
    mask = _attention_mask(attn_mask, key_padding_mask, is_causal, b, h, lq, lk, heads[0].dtype)
    y = attention(*heads, mask, False, attn.dropout if attn.training else 0.0)
    y = pq.pack(y.transpose(1, 2).reshape(b, lq, d))
    return attn.out_proj(y), None


# ---------------------------------------------------------------------------- packed layers
class LayerPacker:
    """What :func:`packed_layers` installs: the packed layers' switch, multiple and packings.

    Attributes:
        layers: names of the packed layers.
        enabled: the layers run packed (``False``: as torch defines them, for a reference run).
        multiple: the multiple packed rows are rounded up to, given the device.
    """

    def __init__(self, layers: list[str], multiple: Callable[[torch.device], int]) -> None:
        self.layers = layers
        self.enabled = True
        self.multiple = multiple
        self._cache: list[tuple[torch.Tensor, int, Packing]] = []

    def packing(self, key_padding_mask: torch.Tensor) -> Packing:
        multiple = self.multiple(key_padding_mask.device)
        for mask, m, p in self._cache:
            if mask is key_padding_mask and m == multiple:
                return p
        p = mask_packing(~_padding_of(key_padding_mask), multiple)
        self._cache = [(key_padding_mask, multiple, p)] + self._cache[:3]
        return p


def _batch_major(x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    return x if batch_first else x.transpose(0, 1)


@contextlib.contextmanager
def _attending(layer: nn.Module, pairs: list[tuple[Packing, Packing]]) -> Iterator[None]:
    for attn, pair in zip(_attentions(layer), pairs):
        object.__setattr__(attn, _PACKINGS, pair)
    try:
        yield
    finally:
        for attn in _attentions(layer):
            vars(attn).pop(_PACKINGS, None)


def _encoder_forward(
    self: nn.TransformerEncoderLayer,
    src: torch.Tensor,
    src_mask: torch.Tensor | None = None,
    src_key_padding_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    inner = getattr(self, _INNER)
    if not self._hlbd_unpad_packer.enabled or src_key_padding_mask is None or src.is_nested or src.dim() != 3:
        return inner(src, src_mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal)
    batch_first = self.self_attn.batch_first
    p = self._hlbd_unpad_packer.packing(src_key_padding_mask)
    with _attending(self, [(p, p)]):
        out = inner(p.pack(_batch_major(src, batch_first)), src_mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal)
    return _batch_major(p.unpack(out), batch_first)


def _decoder_forward(
    self: nn.TransformerDecoderLayer,
    tgt: torch.Tensor,
    memory: torch.Tensor,
    tgt_mask: torch.Tensor | None = None,
    memory_mask: torch.Tensor | None = None,
    tgt_key_padding_mask: torch.Tensor | None = None,
    memory_key_padding_mask: torch.Tensor | None = None,
    tgt_is_causal: bool = False,
    memory_is_causal: bool = False,
) -> torch.Tensor:
    inner = getattr(self, _INNER)
    if not self._hlbd_unpad_packer.enabled or tgt_key_padding_mask is None or memory_key_padding_mask is None or tgt.is_nested or tgt.dim() != 3:
        return inner(tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask, tgt_is_causal, memory_is_causal)
    batch_first = self.self_attn.batch_first
    pt = self._hlbd_unpad_packer.packing(tgt_key_padding_mask)
    pm = self._hlbd_unpad_packer.packing(memory_key_padding_mask)
    with _attending(self, [(pt, pt), (pt, pm)]):
        out = inner(
            pt.pack(_batch_major(tgt, batch_first)),
            pm.pack(_batch_major(memory, batch_first)),
            tgt_mask,
            memory_mask,
            tgt_key_padding_mask,
            memory_key_padding_mask,
            tgt_is_causal,
            memory_is_causal,
        )
    return _batch_major(pt.unpack(out), batch_first)


def _install(module: nn.Module, forward: Callable[..., Any]) -> None:
    object.__setattr__(module, _INNER, module.forward)
    object.__setattr__(module, "forward", types.MethodType(forward, module))


def _remove(module: nn.Module) -> None:
    state = vars(module)
    inner = state.pop(_INNER)
    if getattr(inner, "__self__", None) is module and getattr(inner, "__func__", None) is type(module).forward:
        state.pop("forward", None)  # the class's own forward again
    else:
        object.__setattr__(module, "forward", inner)
    state.pop("_hlbd_unpad_packer", None)


@contextlib.contextmanager
def packed_layers(model: nn.Module, multiple: Callable[[torch.device], int] = lambda device: 1) -> Iterator[LayerPacker]:
    """Run ``model``'s torch transformer layers on their real tokens while entered.

    Re-entrant: entered while the layers are packed already, it yields the packer in force
    (``multiple`` is then ignored) and leaves the layers packed at its exit.

    Args:
        model: a model with ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``
            submodules that get key padding masks.
        multiple: the multiple packed rows are rounded up to, given the device (filler rows).

    Raises:
        ValueError: a layer that cannot run packed (see :func:`check_layers`).
    """
    names = check_layers(model)
    layers = [m for _, m in packable_layers(model)]
    installed = [m for m in layers if _INNER in vars(m)]
    if installed:
        yield installed[0]._hlbd_unpad_packer
        return
    packer = LayerPacker(names, multiple)
    try:
        for layer in layers:
            _install(layer, _encoder_forward if isinstance(layer, nn.TransformerEncoderLayer) else _decoder_forward)
            object.__setattr__(layer, "_hlbd_unpad_packer", packer)
            for attn in _attentions(layer):
                _install(attn, _packed_attention)
        yield packer
    finally:
        for layer in layers:
            if _INNER in vars(layer):
                _remove(layer)
            for attn in _attentions(layer):
                if _INNER in vars(attn):
                    _remove(attn)
