"""Reference encoder-decoder transformer for HLBD, written for compilation.

The layers are built on :func:`torch.nn.functional.scaled_dot_product_attention`
and all masks are computed from tensors, with no ``.item()``, no Python branch
on tensor values and no data-dependent shapes.  The forward pass therefore
compiles with ``torch.compile(fullgraph=True)`` and can be captured in a CUDA
graph.

Architecture: pre-LayerNorm encoder and decoder stacks with final LayerNorms,
learned absolute positions (shared by encoder and decoder), and one token
embedding shared by the encoder input, the decoder input and the output
projection (``model.lm_head.weight is model.embed.weight``).

Masking:

* encoder self-attention and decoder cross-attention ignore source keys equal
  to ``pad_id``; a source row that is entirely padding attends to position 0
  instead (so its outputs stay finite);
* decoder self-attention is causal (``is_causal=True``); target padding needs
  no key mask because, with right padding, a real position never sees a later
  (padding) one.

Consequently cutting trailing columns that are padding in every row from
``src`` and ``tgt`` leaves the logits of the remaining positions unchanged
(up to float rounding).

Token format (matching :mod:`hlbd_fast.data`): targets are
``BOS text EOS PAD...``; train with ``logits = model(src, tgt[:, :-1])``
against ``tgt[:, 1:]`` (ignoring ``pad_id``); :meth:`Seq2SeqTransformer.generate`
starts from ``BOS`` and stops at ``EOS``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_positive_int
from ..packing import Packing, UnpadBatch

__all__ = [
    "ModelConfig",
    "MultiHeadAttention",
    "FeedForward",
    "EncoderLayer",
    "DecoderLayer",
    "Seq2SeqTransformer",
    "build_model",
]


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of :class:`Seq2SeqTransformer` (defaults: the HLBD setup).

    Attributes:
        vocab_size: number of token ids (embedding rows).
        d_model: hidden size.
        n_encoder_layers: encoder depth.
        n_decoder_layers: decoder depth.
        n_heads: attention heads (must divide ``d_model``).
        d_ff: feed-forward inner size.
        dropout: dropout probability (embeddings, attention, residual branches).
        max_length: longest ``src``/``tgt`` length accepted (position table size).
        pad_id: padding token id.
    """

    vocab_size: int = 5000
    d_model: int = 256
    n_encoder_layers: int = 3
    n_decoder_layers: int = 3
    n_heads: int = 8
    d_ff: int = 1024
    dropout: float = 0.1
    max_length: int = 64
    pad_id: int = 0

    def __post_init__(self) -> None:
        """Validate the values; raises ``ValueError`` naming the bad field."""
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "max_length"):
            check_positive_int(name, getattr(self, name), "ModelConfig")
        for name in ("n_encoder_layers", "n_decoder_layers"):
            check_positive_int(name, getattr(self, name), "ModelConfig", minimum=0)
        if self.d_model % self.n_heads:
            raise ValueError(f"ModelConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"ModelConfig.pad_id={self.pad_id} must be in [0, vocab_size={self.vocab_size})")


def dropout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, dropout_p: float) -> torch.Tensor:
    """What ``scaled_dot_product_attention`` computes with ``dropout_p > 0``, in fp32, written out.

    On a CPU, SDPA with dropout takes torch's generic math path (its fused kernel has no
    dropout); these few operations are the same computation (the softmax weights dropped
    by ``F.dropout``, so the same random draws as SDPA's for the same generator state) and
    measured faster on the packed HLBD attention. ``mask``: boolean (True where attention
    is allowed) or additive float, broadcastable to ``[B, H, L, S]``, as SDPA takes it.
    The result has ``q``'s dtype.
    """
    dtype = q.dtype
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.float(), k.float(), v.float()
        scores = torch.matmul(q, k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)
        if is_causal:
            mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril_()
        if mask is not None and mask.dtype == torch.bool:
            scores = scores + torch.zeros(mask.shape, device=q.device).masked_fill_(~mask, float("-inf"))
        elif mask is not None:
            scores = scores + mask.float()
        weights = F.dropout(torch.softmax(scores, dim=-1), dropout_p, training=True)
        return torch.matmul(weights, v).to(dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal)``, by its fastest CPU route.

    On a CPU: with dropout, :func:`dropout_attention` (SDPA's computation and draws, in
    fp32); in bf16 or fp16 without dropout, SDPA in fp32 (torch's CPU flash kernel measured
    about 10x slower in bf16 than in fp32, forward and backward, on ``[32, 8, 16, 32]``),
    cast back. Elsewhere SDPA itself. The result has ``q``'s dtype.
    """
    if q.device.type == "cpu":
        if dropout_p > 0.0:
            return dropout_attention(q, k, v, mask, is_causal, dropout_p)
        if q.dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=is_causal)
            return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)


class MultiHeadAttention(nn.Module):
    """Multi-head attention on ``scaled_dot_product_attention``.

    Self-attention uses one fused ``qkv`` projection; cross-attention
    (``cross=True``) uses ``q`` for the queries and a fused ``kv`` for the memory.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float, cross: bool = False) -> None:
        """Create the projections for ``n_heads`` heads of size ``d_model // n_heads``."""
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.cross = cross
        if cross:
            self.q = nn.Linear(d_model, d_model)
            self.kv = nn.Linear(d_model, 2 * d_model)
        else:
            self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        packing: Packing | None = None,
        memory_packing: Packing | None = None,
    ) -> torch.Tensor:
        """Attend from ``x`` ``[B,T,D]`` to itself or to ``memory`` ``[B,S,D]``.

        ``attn_mask`` is a boolean mask broadcastable to ``[B,H,T,S]``, True
        where attention is allowed. With ``packing`` (and ``memory_packing`` for
        cross-attention), ``x`` and ``memory`` are packed ``[N,D]`` rows: they are
        unpacked for attention only (keys masked by the packing) and the result is
        packed again.
        """
        if packing is not None:
            return self._packed(x, memory, is_causal, packing, memory_packing)
        b, t, d = x.shape
        if self.cross:
            if memory is None:
                raise ValueError("cross-attention needs a memory tensor")
            q = self.q(x)
            k, v = self.kv(memory).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        dropout_p = self.dropout if self.training else 0.0
        if dropout_p > 0.0:  # torch's own dropout attention: the plain loop's
            y = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v), attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
        else:
            y = attention(self._heads(q), self._heads(k), self._heads(v), attn_mask, is_causal)
        out: torch.Tensor = self.out(y.transpose(1, 2).reshape(b, t, d))
        return out

    def _packed(self, x: torch.Tensor, memory: torch.Tensor | None, is_causal: bool, packing: Packing, memory_packing: Packing | None) -> torch.Tensor:
        """Projections on packed rows; attention per sequence on the unpacked ``[B, L]`` layout."""
        if self.cross:
            if memory is None or memory_packing is None:
                raise ValueError("packed cross-attention needs the memory and its packing")
            q = packing.unpack(self.q(x))
            k, v = memory_packing.unpack(self.kv(memory)).chunk(2, dim=-1)
            mask = None if is_causal else memory_packing.key_mask
        else:
            q, k, v = packing.unpack(self.qkv(x)).chunk(3, dim=-1)
            mask = None if is_causal else packing.key_mask
        dropout_p = self.dropout if self.training else 0.0
        y = attention(self._heads(q), self._heads(k), self._heads(v), mask, is_causal, dropout_p)
        b, t = q.shape[0], q.shape[1]
        out: torch.Tensor = self.out(packing.pack(y.transpose(1, 2).reshape(b, t, -1)))
        return out


class FeedForward(nn.Module):
    """Position-wise ``Linear -> GELU -> Dropout -> Linear``."""

    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        """Create the two projections."""
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the feed-forward block to ``[..., d_model]``."""
        out: torch.Tensor = self.fc2(self.drop(F.gelu(self.fc1(x))))
        return out


class EncoderLayer(nn.Module):
    """Pre-LN encoder layer: ``x + SelfAttn(LN(x))`` then ``x + FF(LN(x))``."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float) -> None:
        """Create the sub-blocks."""
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor | None, packing: Packing | None = None) -> torch.Tensor:
        """``x`` ``[B,S,D]``; ``src_mask`` boolean ``[B,1,1,S]`` (True = real key); packed: ``x`` ``[N,D]``."""
        x = x + self.drop(self.self_attn(self.norm1(x), attn_mask=src_mask, packing=packing))
        out: torch.Tensor = x + self.drop(self.ff(self.norm2(x)))
        return out


class DecoderLayer(nn.Module):
    """Pre-LN decoder layer: causal self-attention, cross-attention, feed-forward."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float) -> None:
        """Create the sub-blocks."""
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, dropout, cross=True)
        self.norm3 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        src_mask: torch.Tensor | None,
        packing: Packing | None = None,
        memory_packing: Packing | None = None,
    ) -> torch.Tensor:
        """``x`` ``[B,T,D]``, ``memory`` ``[B,S,D]``, ``src_mask`` boolean ``[B,1,1,S]``; packed: ``[N,D]`` rows."""
        x = x + self.drop(self.self_attn(self.norm1(x), is_causal=True, packing=packing))
        x = x + self.drop(self.cross_attn(self.norm2(x), memory, attn_mask=src_mask, packing=packing, memory_packing=memory_packing))
        out: torch.Tensor = x + self.drop(self.ff(self.norm3(x)))
        return out


def _check_tokens(name: str, tokens: Any, max_length: int) -> None:
    """Shape/dtype checks only (never reads values)."""
    if not isinstance(tokens, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of token ids with shape [batch, length], got {type(tokens).__name__}")
    if tokens.dim() != 2:
        raise ValueError(f"{name} must be 2-D [batch, length], got shape {tuple(tokens.shape)}; add a batch dimension with .unsqueeze(0)")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids (e.g. torch.long), got {tokens.dtype}; convert with .long()")
    if tokens.shape[1] > max_length:
        raise ValueError(
            f"{name} has length {tokens.shape[1]}, longer than the model's "
            f"max_length={max_length}; truncate the sequences or build the model "
            f"with max_length >= {tokens.shape[1]}"
        )
    if tokens.shape[1] < 1:
        raise ValueError(f"{name} has length 0; it needs at least one position")


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder transformer with tied embeddings.

    Build with a :class:`ModelConfig`, keyword overrides, or both::

        Seq2SeqTransformer()                           # HLBD defaults
        Seq2SeqTransformer(ModelConfig(d_model=128))
        Seq2SeqTransformer(vocab_size=900, dropout=0.0)

    Submodules: ``embed`` (token embedding, shared), ``pos_embed``,
    ``encoder_layers`` and ``decoder_layers`` (``nn.ModuleList``; each layer is
    called as ``layer(x, src_mask)`` / ``layer(x, memory, src_mask)`` with
    tensors only and returns a tensor, so it can be wrapped for activation
    checkpointing), ``encoder_norm``, ``decoder_norm`` and ``lm_head`` (whose
    weight *is* ``embed.weight``).

    Attributes:
        config: the :class:`ModelConfig`.
        vocab_size: number of token ids.
        pad_id: padding id.
        max_length: longest accepted ``src``/``tgt`` length.
    """

    def __init__(self, config: ModelConfig | None = None, **overrides: Any) -> None:
        """Create the model from ``config`` (default :class:`ModelConfig`) and overrides.

        Raises:
            TypeError: for an unknown override name.
            ValueError: for invalid values (see :class:`ModelConfig`).
        """
        super().__init__()
        if config is None:
            config = ModelConfig(**overrides)
        elif not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig or None, got {type(config).__name__}; pass hyper-parameters as keyword arguments")
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config: ModelConfig = config
        self.vocab_size: int = config.vocab_size
        self.pad_id: int = config.pad_id
        self.max_length: int = config.max_length
        d = config.d_model
        self.embed_scale: float = math.sqrt(d)

        self.embed = nn.Embedding(config.vocab_size, d)
        self.pos_embed = nn.Embedding(config.max_length, d)
        self.embed_drop = nn.Dropout(config.dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(d, config.n_heads, config.d_ff, config.dropout) for _ in range(config.n_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(d, config.n_heads, config.d_ff, config.dropout) for _ in range(config.n_decoder_layers))
        self.encoder_norm = nn.LayerNorm(d)
        self.decoder_norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.reset_parameters()
        self.lm_head.weight = self.embed.weight  # tie: one Parameter

    def reset_parameters(self) -> None:
        """(Re)initialise all weights deterministically given the torch RNG state."""
        d = self.config.d_model
        nn.init.normal_(self.embed.weight, std=d**-0.5)
        nn.init.normal_(self.pos_embed.weight, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module is not self.lm_head:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # ----------------------------------------------------------------- parts
    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) * self.embed_scale + self.pos_embed(pos)
        out: torch.Tensor = self.embed_drop(x)
        return out

    def source_mask(self, src: torch.Tensor) -> torch.Tensor:
        """Boolean key mask ``[B,1,1,S]``: True at non-pad source positions.

        A row that is entirely padding gets position 0 enabled so attention
        over it is well defined (no NaN).  Computed from tensors only.
        """
        keep = src.ne(self.pad_id)
        first = torch.arange(src.shape[1], device=src.device).eq(0)
        keep = keep | (first & ~keep.any(dim=1, keepdim=True))
        return keep[:, None, None, :]

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the encoder: returns ``(memory [B,S,D], src_mask [B,1,1,S])``."""
        _check_tokens("src", src, self.max_length)
        src_mask = self.source_mask(src)
        x = self._embed(src)
        for layer in self.encoder_layers:
            x = layer(x, src_mask)
        return self.encoder_norm(x), src_mask

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """Run the decoder on ``tgt`` ``[B,T]``: returns logits ``[B,T,V]``."""
        _check_tokens("tgt", tgt, self.max_length)
        x = self._embed(tgt)
        for layer in self.decoder_layers:
            x = layer(x, memory, src_mask)
        logits: torch.Tensor = self.lm_head(self.decoder_norm(x))
        return logits

    def check_inputs(self, src_tokens: Any, tgt_tokens: Any) -> None:
        """Validate a ``(src, tgt)`` batch by shape and dtype only (values are never read).

        :meth:`forward` runs the same checks.  Under ``torch.compile(fullgraph=True)``
        a failing check surfaces as a ``torch._dynamo`` error whose message
        contains this ``ValueError``; call ``check_inputs`` before the compiled
        model to get the plain ``ValueError``.

        Raises:
            ValueError: if an input is not a 2-D integer tensor, is longer than
                ``max_length`` (the message names both lengths), or the batch
                sizes differ.
        """
        _check_tokens("src", src_tokens, self.max_length)
        _check_tokens("tgt", tgt_tokens, self.max_length)
        if src_tokens.shape[0] != tgt_tokens.shape[0]:
            raise ValueError(f"src and tgt batch sizes differ: {src_tokens.shape[0]} vs {tgt_tokens.shape[0]}")

    def forward(self, src_tokens: torch.Tensor, tgt_tokens: torch.Tensor, unpad: UnpadBatch | None = None) -> torch.Tensor:
        """Logits ``[B,T,V]`` for source ids ``[B,S]`` and decoder input ids ``[B,T]``.

        With ``unpad`` (:class:`~hlbd_fast.packing.UnpadBatch`, what
        :class:`~hlbd_fast.strategies.Unpad` passes) only the real tokens run: the
        result is logits ``[N, V]`` for the packed target positions
        (``unpad.target``), equal to the padded logits there up to float rounding.

        Raises:
            ValueError: if an input is not a 2-D integer tensor, is longer than
                ``max_length``, or the batch sizes differ (shape checks only).
        """
        self.check_inputs(src_tokens, tgt_tokens)
        if unpad is not None:
            return self._forward_packed(src_tokens, tgt_tokens, unpad)
        memory, src_mask = self.encode(src_tokens)
        return self.decode(tgt_tokens, memory, src_mask)

    def _embed_packed(self, tokens: torch.Tensor, packing: Packing) -> torch.Tensor:
        x = self.embed(packing.pack(tokens)) * self.embed_scale + self.pos_embed(packing.positions)
        out: torch.Tensor = self.embed_drop(x)
        return out

    def _forward_packed(self, src: torch.Tensor, tgt: torch.Tensor, unpad: UnpadBatch) -> torch.Tensor:
        """The encoder and decoder on the real tokens only; logits ``[N_target, V]``."""
        sp, tp = unpad.source, unpad.target
        x = self._embed_packed(src, sp)
        for layer in self.encoder_layers:
            x = layer(x, None, sp)
        memory = self.encoder_norm(x)
        y = self._embed_packed(tgt, tp)
        for dec in self.decoder_layers:
            y = dec(y, memory, None, tp, sp)
        logits: torch.Tensor = self.lm_head(self.decoder_norm(y))
        return logits

    # ------------------------------------------------------------- inference
    @torch.no_grad()
    def generate(
        self,
        src: torch.Tensor,
        max_new_tokens: int = 32,
        greedy: bool = True,
        temperature: float = 1.0,
        bos_id: int = 2,
        eos_id: int = 3,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Generate target ids for ``src`` ``[B,S]`` (eval mode, no grad).

        Decoding starts from ``bos_id`` (not included in the output) and
        stops when every row has produced ``eos_id`` or after
        ``max_new_tokens`` steps.  Each row's ``eos_id`` is kept in the output
        and positions after it are ``pad_id``; decode a row with
        ``CharTokenizer.decode``.  The model's train/eval mode is restored.

        Args:
            src: source ids ``[B,S]`` (same format as in training).
            max_new_tokens: most tokens to generate; at most ``max_length - 1``.
            greedy: argmax decoding; ``False`` samples from the softmax.
            temperature: softmax temperature for sampling (> 0).
            bos_id: first decoder input.
            eos_id: end token.
            generator: RNG for sampling.

        Returns:
            ``torch.long`` tensor ``[B, n]`` with ``n <= max_new_tokens``.

        Raises:
            ValueError: for bad ``src`` or ``max_new_tokens`` outside
                ``[1, max_length - 1]`` or a non-positive ``temperature``.
        """
        _check_tokens("src", src, self.max_length)
        if not 1 <= max_new_tokens <= self.max_length - 1:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} must be in [1, {self.max_length - 1}] "
                f"(the decoder input, BOS included, is at most max_length="
                f"{self.max_length} long)"
            )
        if not greedy and not temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        was_training = self.training
        self.eval()
        try:
            memory, src_mask = self.encode(src)
            b = src.shape[0]
            tokens = torch.full((b, 1), bos_id, dtype=torch.long, device=src.device)
            finished = torch.zeros(b, dtype=torch.bool, device=src.device)
            out: list[torch.Tensor] = []
            for _ in range(max_new_tokens):
                logits = self.decode(tokens, memory, src_mask)[:, -1].float()
                if greedy:
                    nxt = logits.argmax(dim=-1)
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                nxt = torch.where(finished, torch.full_like(nxt, self.pad_id), nxt)
                out.append(nxt)
                finished = finished | nxt.eq(eos_id)
                tokens = torch.cat([tokens, nxt[:, None]], dim=1)
                if bool(finished.all()):
                    break
            return torch.stack(out, dim=1)
        finally:
            self.train(was_training)


def build_model(tokenizer_or_vocab_size: Any = 5000, **overrides: Any) -> Seq2SeqTransformer:
    """Build a :class:`Seq2SeqTransformer` sized for a tokenizer (or a vocabulary size).

    Args:
        tokenizer_or_vocab_size: an int, or an object with ``vocab_size`` (and
            optionally ``pad_id``) such as ``CharTokenizer``.
        **overrides: any :class:`ModelConfig` field.
    """
    if isinstance(tokenizer_or_vocab_size, int) and not isinstance(tokenizer_or_vocab_size, bool):
        overrides.setdefault("vocab_size", tokenizer_or_vocab_size)
    elif hasattr(tokenizer_or_vocab_size, "vocab_size"):
        overrides.setdefault("vocab_size", int(tokenizer_or_vocab_size.vocab_size))
        if hasattr(tokenizer_or_vocab_size, "pad_id"):
            overrides.setdefault("pad_id", int(tokenizer_or_vocab_size.pad_id))
    else:
        raise ValueError(f"tokenizer_or_vocab_size must be an int or a tokenizer with a vocab_size attribute, got {type(tokenizer_or_vocab_size).__name__}")
    return Seq2SeqTransformer(ModelConfig(**overrides))
