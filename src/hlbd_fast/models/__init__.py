"""Models: the reference HLBD encoder-decoder transformer."""

from .transformer import (
    DecoderLayer,
    EncoderLayer,
    FeedForward,
    ModelConfig,
    MultiHeadAttention,
    Seq2SeqTransformer,
    build_model,
)

__all__ = [
    "DecoderLayer",
    "EncoderLayer",
    "FeedForward",
    "ModelConfig",
    "MultiHeadAttention",
    "Seq2SeqTransformer",
    "build_model",
]
