"""Character-level tokenizer with a vocabulary that is fixed at construction.

The vocabulary is built once from a list of texts (sorted unique characters,
so ids are deterministic) and never grows afterwards.  Characters that were
not seen at construction map to ``UNK_ID`` and are counted.  This makes the
tokenizer safe to share with DataLoader worker processes: every process sees
the same ids.

Token layout
------------
* ``PAD_ID = 0``, ``UNK_ID = 1``, ``BOS_ID = 2``, ``EOS_ID = 3``.
* Character ids start at ``NUM_SPECIAL_TOKENS = 4`` in sorted character order.
* ``vocab_size`` may be larger than ``4 + number of characters``; ids above the
  last character are reserved and never produced by :meth:`CharTokenizer.encode`.

Sequence format
---------------
``encode(text, max_length, add_special_tokens=False)`` gives the characters,
truncated to ``max_length`` and right-padded with ``PAD_ID``.
``add_special_tokens=True`` gives ``BOS text EOS`` followed by padding.  When
such a text is too long, the *text* is cut so that ``BOS`` and ``EOS`` are
always kept: a truncated target still teaches the model to stop.

:class:`PairDataset` and :func:`encode_pairs` use the training format expected
by a shifted teacher-forcing loss (``model(src, tgt[:, :-1])`` against
``tgt[:, 1:]``): targets are ``BOS text EOS PAD...`` and sources are
``text PAD...`` (or ``text EOS PAD...`` with ``src_eos=True``).

Saving
------
:meth:`CharTokenizer.save` writes UTF-8 JSON atomically (an existing file is
replaced only by a complete new one).  Lone UTF-16 surrogates such as
``"\\ud800"`` (what a JSON escape without its pair decodes to) are refused
when a tokenizer is built or loaded: they are not characters and cannot be
written as UTF-8.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from torch.utils.data import Dataset

from .._io import atomic_write

__all__ = [
    "PAD_ID",
    "UNK_ID",
    "BOS_ID",
    "EOS_ID",
    "NUM_SPECIAL_TOKENS",
    "SPECIAL_TOKENS",
    "UNK_TEXT",
    "CharTokenizer",
    "PairDataset",
    "encode_pairs",
]

logger = logging.getLogger("hlbd_fast")

PathLike = Union[str, "os.PathLike[str]"]

#: Id of the padding token (also the value used to right-pad sequences).
PAD_ID: int = 0
#: Id of the unknown-character token.
UNK_ID: int = 1
#: Id of the begin-of-sequence token (first token of every target).
BOS_ID: int = 2
#: Id of the end-of-sequence token.
EOS_ID: int = 3
#: Number of special ids reserved before the first character id.
NUM_SPECIAL_TOKENS: int = 4
#: Printable names of the special tokens, indexed by id.
SPECIAL_TOKENS: tuple[str, str, str, str] = ("<pad>", "<unk>", "<bos>", "<eos>")
#: Text that :meth:`CharTokenizer.decode` emits for ``UNK_ID`` and reserved ids.
UNK_TEXT: str = "\ufffd"

_FORMAT_NAME = "hlbd_fast.CharTokenizer"
_FORMAT_VERSION = 1


def _lone_surrogate(text: Iterable[str]) -> str | None:
    """The first lone UTF-16 surrogate (U+D800..U+DFFF) in ``text``, or None."""
    return next((c for c in text if "\ud800" <= c <= "\udfff"), None)


def _surrogate_error(char: str, where: str) -> ValueError:
    """The error for a lone surrogate ``char`` found in ``where``."""
    return ValueError(
        f"{where} holds a lone UTF-16 surrogate {char!r} (U+{ord(char):04X}), which is "
        "not a character and cannot be saved as UTF-8 (it usually comes from a JSON "
        "'\\ud83c'-style escape without its pair); fix or drop that text"
    )


class CharTokenizer:
    """A frozen character-level tokenizer.

    Build it with :meth:`from_texts` (or :meth:`from_pairs`); load a saved one
    with :meth:`load`.  Instances are picklable and their vocabulary never
    changes after construction (:attr:`is_frozen` is always ``True``).

    Attributes:
        unknown_count: number of characters mapped to ``UNK_ID`` by
            :meth:`encode` so far (statistics only; not saved).
        truncated_count: number of texts cut by :meth:`encode` to fit
            ``max_length`` so far (statistics only; not saved).
    """

    pad_id: int = PAD_ID
    unk_id: int = UNK_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID

    def __init__(self, chars: Sequence[str], vocab_size: int | None = None) -> None:
        """Create a tokenizer from an ordered sequence of distinct characters.

        Args:
            chars: the characters, in id order; ``chars[i]`` gets id ``i + 4``.
                Each must be a single-code-point string, without duplicates.
            vocab_size: total number of ids (specials + characters + reserved).
                ``None`` means exactly ``4 + len(chars)``.

        Raises:
            ValueError: on an empty, duplicated or multi-character entry, a
                lone UTF-16 surrogate (``"\\ud800"``: not a character, and it
                could not be saved), or a ``vocab_size`` smaller than
                ``4 + len(chars)``.
        """
        chars = tuple(chars)
        if not chars:
            raise ValueError("CharTokenizer needs at least one character; build it with CharTokenizer.from_texts(texts) from a non-empty list of texts")
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"CharTokenizer chars must be single characters, got {c!r}")
            if _lone_surrogate(c):
                raise _surrogate_error(c, "CharTokenizer chars")
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer chars must not contain duplicates")
        needed = NUM_SPECIAL_TOKENS + len(chars)
        if vocab_size is None:
            vocab_size = needed
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise ValueError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
        if vocab_size < needed:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: the texts contain "
                f"{len(chars)} distinct characters, which need {needed} ids "
                f"({len(chars)} + {NUM_SPECIAL_TOKENS} special tokens); pass "
                f"vocab_size >= {needed} or vocab_size=None"
            )
        self._chars: tuple[str, ...] = chars
        self._char_to_id: dict[str, int] = {c: i + NUM_SPECIAL_TOKENS for i, c in enumerate(chars)}
        self._vocab_size: int = vocab_size
        self.unknown_count: int = 0
        self.truncated_count: int = 0
        self._warned_truncation: bool = False
        self._warned_unknown: bool = False

    # ------------------------------------------------------------------ build
    @classmethod
    def from_texts(cls, texts: Iterable[str], vocab_size: int | None = None) -> CharTokenizer:
        """Build a tokenizer from all characters of ``texts``.

        Characters are sorted by code point, so the same texts always give the
        same ids regardless of their order.

        Args:
            texts: every text the tokenizer must know (sources and targets).
            vocab_size: total ids to reserve (e.g. 5000); ``None`` means
                ``4 + number of distinct characters``.

        Raises:
            ValueError: if ``texts`` is empty or holds no characters, if an
                element is not a string or holds a lone UTF-16 surrogate (the
                message names it), or if ``vocab_size`` is too small (the
                message names both numbers).
        """
        if isinstance(texts, str):
            raise ValueError("texts must be a list of strings, not a single string; wrap it: CharTokenizer.from_texts([text])")
        texts = list(texts)
        if not texts:
            raise ValueError("texts is empty: CharTokenizer.from_texts needs the list of all source and target texts to build its vocabulary")
        charset: set[str] = set()
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"texts[{i}] is a {type(t).__name__}, expected str")
            charset.update(t)
        if not charset:
            raise ValueError(f"texts holds {len(texts)} empty strings and no characters; pass the real source and target texts")
        bad = _lone_surrogate(sorted(charset))
        if bad is not None:
            i = next(i for i, t in enumerate(texts) if bad in t)
            raise _surrogate_error(bad, f"texts[{i}] {texts[i]!r:.60}")
        return cls(sorted(charset), vocab_size=vocab_size)

    @classmethod
    def from_pairs(cls, pairs: Iterable[Sequence[str]], vocab_size: int | None = None) -> CharTokenizer:
        """Build a tokenizer from both sides of ``(source, target)`` pairs.

        Equivalent to ``from_texts([s for s, _ in pairs] + [t for _, t in pairs])``.
        """
        texts: list[str] = []
        for i, pair in enumerate(pairs):
            if isinstance(pair, str) or len(pair) != 2:
                raise ValueError(f"pairs[{i}] must be a (source, target) pair")
            texts.extend(pair)
        return cls.from_texts(texts, vocab_size=vocab_size)

    # ------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Total number of ids (specials + characters + reserved ids)."""
        return self._vocab_size

    @property
    def num_chars(self) -> int:
        """Number of distinct characters known to the tokenizer."""
        return len(self._chars)

    @property
    def chars(self) -> tuple[str, ...]:
        """The known characters in id order (``chars[i]`` has id ``i + 4``)."""
        return self._chars

    @property
    def is_frozen(self) -> bool:
        """Always ``True``: the vocabulary cannot grow after construction."""
        return True

    def __len__(self) -> int:
        """Return :attr:`vocab_size`."""
        return self._vocab_size

    def __eq__(self, other: object) -> bool:
        """Tokenizers are equal when they map every id the same way."""
        if not isinstance(other, CharTokenizer):
            return NotImplemented
        return self._chars == other._chars and self._vocab_size == other._vocab_size

    def __hash__(self) -> int:
        """Hash of the characters and vocabulary size."""
        return hash((self._chars, self._vocab_size))

    def __repr__(self) -> str:
        """Short description with the sizes."""
        return f"CharTokenizer(num_chars={self.num_chars}, vocab_size={self.vocab_size})"

    def token_to_id(self, char: str) -> int:
        """Id of one character (``UNK_ID`` when unknown; does not count it)."""
        return self._char_to_id.get(char, UNK_ID)

    def id_to_token(self, token_id: int) -> str:
        """Printable form of one id: the character, or ``<pad>``-style names."""
        if 0 <= token_id < NUM_SPECIAL_TOKENS:
            return SPECIAL_TOKENS[token_id]
        idx = token_id - NUM_SPECIAL_TOKENS
        if 0 <= idx < len(self._chars):
            return self._chars[idx]
        if 0 <= token_id < self._vocab_size:
            return UNK_TEXT
        raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self._vocab_size})")

    # --------------------------------------------------------------- encode
    def encode(
        self,
        text: str,
        max_length: int = 64,
        add_special_tokens: bool = False,
        *,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
    ) -> list[int]:
        """Encode ``text`` to exactly ``max_length`` ids.

        Args:
            text: the text to encode.
            max_length: output length; shorter results are right-padded with
                ``PAD_ID`` and longer texts are cut.
            add_special_tokens: wrap as ``BOS text EOS``.
            add_bos: override ``add_special_tokens`` for the leading ``BOS``.
            add_eos: override ``add_special_tokens`` for the trailing ``EOS``.

        Truncation cuts the text, never the special tokens: with
        ``add_special_tokens=True`` a too-long text gives
        ``BOS text[:max_length-2] EOS``.  Each truncated text adds one to
        :attr:`truncated_count`; the first one also emits a ``UserWarning``
        (once per tokenizer).  Unknown characters become ``UNK_ID``, add to
        :attr:`unknown_count` and warn once per tokenizer.

        Raises:
            ValueError: if ``text`` is not a string or ``max_length`` cannot
                hold the requested special tokens.
        """
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        bos = add_special_tokens if add_bos is None else add_bos
        eos = add_special_tokens if add_eos is None else add_eos
        n_special = int(bos) + int(eos)
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise ValueError(f"max_length must be an int, got {type(max_length).__name__}")
        if max_length < n_special + 1:
            raise ValueError(f"max_length={max_length} is too small: it must hold at least one character plus {n_special} special token(s)")
        body = self._fit(text, max_length, n_special)
        ids: list[int] = [BOS_ID] if bos else []
        ids.extend(self._lookup(body, text))
        if eos:
            ids.append(EOS_ID)
        ids.extend([PAD_ID] * (max_length - len(ids)))
        return ids

    def _fit(self, text: str, max_length: int, n_special: int) -> str:
        """``text`` cut to the room ``max_length`` leaves beside the special tokens (counted; warned once)."""
        room = max_length - n_special
        if len(text) <= room:
            return text
        self.truncated_count += 1
        if not self._warned_truncation:
            self._warned_truncation = True
            warnings.warn(
                f"text of {len(text)} characters truncated to {room} characters "
                f"(max_length={max_length}" + (f" with {n_special} special token(s)" if n_special else "") + "); raise max_length to keep whole texts. Further "
                "truncations are counted in tokenizer.truncated_count "
                "without another warning.",
                UserWarning,
                stacklevel=3,
            )
        return text[:room]

    def _lookup(self, body: str, text: str) -> list[int]:
        """The ids of ``body``'s characters; unknown ones become ``UNK_ID`` (counted; warned once)."""
        lookup = self._char_to_id
        ids = [lookup.get(c, UNK_ID) for c in body]
        unknown = sum(1 for c in body if c not in lookup)
        if unknown:
            self.unknown_count += unknown
            if not self._warned_unknown:
                self._warned_unknown = True
                warnings.warn(
                    f"{unknown} character(s) of {text!r} are not in the vocabulary "
                    "and were encoded as UNK_ID; build the tokenizer from all "
                    "texts. Further unknown characters are counted in "
                    "tokenizer.unknown_count without another warning.",
                    UserWarning,
                    stacklevel=3,
                )
        return ids

    def encode_batch(
        self,
        texts: Sequence[str],
        max_length: int = 64,
        add_special_tokens: bool = False,
        *,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
    ) -> torch.Tensor:
        """Encode several texts into a ``torch.long`` tensor ``[N, max_length]``.

        Same options and counting as :meth:`encode`.

        Raises:
            ValueError: if ``texts`` is a single string.
        """
        if isinstance(texts, str):
            raise ValueError("texts must be a list of strings, not a single string; use encode(text) or encode_batch([text])")
        rows = [self.encode(t, max_length, add_special_tokens, add_bos=add_bos, add_eos=add_eos) for t in texts]
        if not rows:
            return torch.empty((0, max_length), dtype=torch.long)
        return torch.tensor(rows, dtype=torch.long)

    # --------------------------------------------------------------- decode
    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Turn ids back into text.

        ``PAD_ID`` and ``BOS_ID`` are skipped, decoding stops at the first
        ``EOS_ID``; ``UNK_ID`` and reserved ids become :data:`UNK_TEXT`.

        Args:
            ids: a list/tuple of ints or a 1-D integer tensor.

        Raises:
            ValueError: for a tensor that is not 1-D or an id outside
                ``[0, vocab_size)``.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects a 1-D tensor, got shape {tuple(ids.shape)}; use decode_batch for 2-D tensors")
            ids = ids.tolist()
        out: list[str] = []
        chars = self._chars
        n = len(chars)
        for raw in ids:
            i = int(raw)
            if i == EOS_ID:
                break
            if i == PAD_ID or i == BOS_ID:
                continue
            if not 0 <= i < self._vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self._vocab_size})")
            j = i - NUM_SPECIAL_TOKENS
            out.append(chars[j] if 0 <= j < n else UNK_TEXT)
        return "".join(out)

    def decode_batch(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Decode each row of a 2-D tensor (or list of id lists)."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 2:
                raise ValueError(f"decode_batch expects a 2-D tensor, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        return [self.decode(row) for row in ids]

    # ----------------------------------------------------------- save/load
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (characters and vocabulary size)."""
        return {
            "format": _FORMAT_NAME,
            "version": _FORMAT_VERSION,
            "vocab_size": self._vocab_size,
            "special_tokens": list(SPECIAL_TOKENS),
            "chars": "".join(self._chars),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CharTokenizer:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: if ``data`` is not a saved ``CharTokenizer``.
        """
        if not isinstance(data, dict) or data.get("format") != _FORMAT_NAME:
            raise ValueError(f"not a saved CharTokenizer (expected format={_FORMAT_NAME!r})")
        if data.get("version") != _FORMAT_VERSION:
            raise ValueError(f"unsupported CharTokenizer file version {data.get('version')!r}")
        chars = data.get("chars")
        if not isinstance(chars, str):
            raise ValueError("saved CharTokenizer has no 'chars' string")
        return cls(list(chars), vocab_size=data.get("vocab_size"))

    def save(self, path: PathLike) -> Path:
        """Write the tokenizer as UTF-8 JSON (``ensure_ascii=False``); returns the path.

        The JSON is built before the file is touched and written atomically
        (a temporary beside ``path``, fsynced, then renamed over it): a failed
        save leaves an existing ``path`` as it was and no temporary behind.

        Raises:
            ValueError: naming ``path``, if the characters cannot be encoded
                as UTF-8 (only a tokenizer built without the construction
                checks, e.g. unpickled from an old version, can hold them).
            OSError: if the file cannot be written.
        """
        p = Path(path)
        try:
            text = json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n"
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = e.object[e.start]
            raise ValueError(f"cannot save the tokenizer to {p}: {_surrogate_error(bad, 'its vocabulary')}; {p} was not touched") from None
        atomic_write(p, lambda f: f.write(data))
        return p

    @classmethod
    def load(cls, path: PathLike) -> CharTokenizer:
        """Read a tokenizer written by :meth:`save`.

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            ValueError: if the file is not a saved tokenizer.
        """
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {p}")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{p}: not a JSON tokenizer file ({e})") from e
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from e


def _check_pairs(pairs: Sequence[Sequence[str]]) -> list[tuple[str, str]]:
    """``pairs`` as a non-empty list of ``(source, target)`` string tuples."""
    if isinstance(pairs, (str, bytes)):
        raise ValueError("pairs must be a list of (source, target) string pairs")
    out: list[tuple[str, str]] = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, (str, bytes)) or len(pair) != 2:
            raise ValueError(f"pairs[{i}] must be a (source, target) pair, got {pair!r}")
        s, t = pair
        if not isinstance(s, str) or not isinstance(t, str):
            raise ValueError(f"pairs[{i}] must hold two strings, got ({type(s).__name__}, {type(t).__name__})")
        out.append((s, t))
    if not out:
        raise ValueError("pairs is empty: pass the (source, target) pairs, e.g. from load_hlbd()")
    return out


def _check_tokenizer(tokenizer: Any) -> None:
    """Refuse a tokenizer whose vocabulary is not frozen."""
    if not getattr(tokenizer, "is_frozen", False):
        raise ValueError("tokenizer must have a frozen vocabulary (tokenizer.is_frozen is not True); build a CharTokenizer once from all texts before encoding")


def encode_pairs(
    pairs: Sequence[Sequence[str]],
    tokenizer: CharTokenizer,
    max_length: int = 64,
    add_special_tokens: bool = True,
    *,
    src_eos: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``(source, target)`` pairs into two ``torch.long`` tensors ``[N, max_length]``.

    Format (the default, for a loss on ``model(src, tgt[:, :-1])`` vs ``tgt[:, 1:]``):

    * source: ``text PAD...`` (``text EOS PAD...`` with ``src_eos=True``);
    * target: ``BOS text EOS PAD...``.

    ``add_special_tokens=False`` encodes targets as bare text (then the first
    character is never a prediction target).  Truncation keeps ``BOS``/``EOS``
    (see :meth:`CharTokenizer.encode`).

    Raises:
        ValueError: on empty or malformed ``pairs`` or a tokenizer that is not frozen.
    """
    checked = _check_pairs(pairs)
    _check_tokenizer(tokenizer)
    src = tokenizer.encode_batch([s for s, _ in checked], max_length, add_bos=False, add_eos=src_eos)
    tgt = tokenizer.encode_batch([t for _, t in checked], max_length, add_special_tokens=add_special_tokens)
    return src, tgt


class PairDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Map-style dataset of pre-encoded ``(src, tgt)`` token rows.

    All pairs are encoded once at construction (see :func:`encode_pairs` for
    the format), so DataLoader workers only index tensors and never call the
    tokenizer.  ``dataset[i]`` is ``(src[i], tgt[i])``, two ``torch.long``
    tensors of shape ``[max_length]``.

    Attributes:
        src: all sources, ``torch.long`` ``[N, max_length]``.
        tgt: all targets, ``torch.long`` ``[N, max_length]``.
        pairs: the text pairs, in dataset order.
        tokenizer: the (frozen) tokenizer used, e.g. to decode rows.
        max_length: the row length.
    """

    def __init__(
        self,
        pairs: Sequence[Sequence[str]],
        tokenizer: CharTokenizer,
        max_length: int = 64,
        add_special_tokens: bool = True,
        *,
        src_eos: bool = False,
    ) -> None:
        """Encode ``pairs`` with ``tokenizer``; arguments as in :func:`encode_pairs`."""
        self.pairs: list[tuple[str, str]] = _check_pairs(pairs)
        self.tokenizer: CharTokenizer = tokenizer
        self.max_length: int = max_length
        self.src, self.tgt = encode_pairs(
            self.pairs,
            tokenizer,
            max_length,
            add_special_tokens=add_special_tokens,
            src_eos=src_eos,
        )
        logger.debug("PairDataset: encoded %d pairs to length %d", len(self.pairs), max_length)

    def __len__(self) -> int:
        """Return the number of pairs."""
        return self.src.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(src[index], tgt[index])``."""
        return self.src[index], self.tgt[index]

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(src, tgt)``, the whole dataset as two ``[N, max_length]`` tensors."""
        return self.src, self.tgt
