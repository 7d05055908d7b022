"""HLBD data: file reader, bundled sample, frozen char tokenizer, encoded datasets."""

from .bundled import bundled_samples, save_bundled_hlbd
from .hlbd import (
    DEFAULT_LEVELS,
    TARGET_LEVEL,
    LevelKey,
    load_hlbd,
    load_hlbd_samples,
    samples_to_pairs,
)
from .tokenizer import (
    BOS_ID,
    EOS_ID,
    NUM_SPECIAL_TOKENS,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    UNK_TEXT,
    CharTokenizer,
    PairDataset,
    encode_pairs,
)

__all__ = [
    "BOS_ID",
    "DEFAULT_LEVELS",
    "EOS_ID",
    "NUM_SPECIAL_TOKENS",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "TARGET_LEVEL",
    "UNK_ID",
    "UNK_TEXT",
    "CharTokenizer",
    "LevelKey",
    "PairDataset",
    "bundled_samples",
    "encode_pairs",
    "load_hlbd",
    "load_hlbd_samples",
    "samples_to_pairs",
    "save_bundled_hlbd",
]
