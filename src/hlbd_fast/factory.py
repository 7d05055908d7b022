"""``--model MODULE:FACTORY`` and ``--data``: the user's model and data for ``hlbd-fast doctor`` and ``hlbd-fast tune``.

The factory is called without arguments and returns a model (trained on HLBD pairs,
``--data`` or the bundled ones, encoded for its vocabulary) or a ``(model, data)`` pair,
``data`` as :meth:`~hlbd_fast.FastTrainer.fit` takes it. Without ``--model``: the
reference :class:`~hlbd_fast.models.Seq2SeqTransformer` on the same pairs.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import torch
from torch import nn

from ._validation import infer_vocab_size

__all__ = ["FactoryError", "load", "reference"]


class FactoryError(ValueError):
    """A ``--model`` or ``--data`` that cannot give a model and data; the message says the fix."""


def reference(vocab_size: int | None = None, model: nn.Module | None = None, data: str | os.PathLike[str] | None = None) -> tuple[nn.Module, Any]:
    """HLBD pairs (``data``: a file; default the bundled 600), encoded for ``vocab_size``, and ``model``
    (default: the reference model, built under seed 0)."""
    from .data import CharTokenizer, encode_pairs
    from .models import Seq2SeqTransformer

    pairs = _pairs(data)
    vocab = 5000 if vocab_size is None else vocab_size
    try:
        tokenizer = CharTokenizer.from_pairs(pairs, vocab_size=vocab)
    except ValueError as e:
        raise FactoryError(f"the model's vocabulary ({vocab}) is too small for the HLBD data: {e}; return (model, data) from the factory") from None
    max_length = getattr(model, "max_length", 64) if model is not None else 64
    encoded = encode_pairs(pairs, tokenizer, max_length=int(max_length) if isinstance(max_length, int) else 64)
    if model is None:
        torch.manual_seed(0)
        model = Seq2SeqTransformer(vocab_size=tokenizer.vocab_size)
    return model, encoded


def _pairs(data: str | os.PathLike[str] | None) -> list[tuple[str, str]]:
    """The HLBD pairs of ``data``; every problem a one-line FactoryError naming the path."""
    from .data import load_hlbd

    where = "the bundled HLBD data" if data is None else f"--data {str(data)!r}"
    try:
        return load_hlbd(data)
    except FileNotFoundError:
        raise FactoryError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise FactoryError(f"{where}: is a directory; name an HLBD file") from None
    except OSError as e:
        raise FactoryError(f"{where}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:
        raise FactoryError(f"{where}: {e}") from None


def load(spec: str, data: str | os.PathLike[str] | None = None) -> tuple[nn.Module, Any]:
    """The model (and data) of ``--model module:factory``; a model alone gets the HLBD pairs of ``data``."""
    if ":" not in spec:
        raise FactoryError(f"--model {spec!r} must be 'module:factory', e.g. --model mypkg.models:make_model")
    mod_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: a module in the current folder is found
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise FactoryError(f"--model {spec}: cannot import {mod_name!r} ({e}); run from its folder or install it") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise FactoryError(f"--model {spec}: {mod_name} has no callable {attr!r}")
    made = factory()
    if isinstance(made, nn.Module):
        return reference(infer_vocab_size(made), made, data)
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        if data is not None:
            raise FactoryError(f"--model {spec} returns its own data; leave out --data, or return only the model")
        return made[0], made[1]
    raise FactoryError(f"--model {spec}: the factory returned {type(made).__name__}; return a model or a (model, data) pair")
