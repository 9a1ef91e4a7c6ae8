"""The tutorial's 86-character vocabulary, plus explicit special ids.

Ids 0..85 are exactly the tutorial's (its `vocab` list, in its order), so a model trained by
the tutorial maps one to one. Two special ids follow: PAD (padding, never a counted target)
and OOV (any character outside the vocabulary; the tutorial silently maps those to id 0, 'd').
"""

from __future__ import annotations

import numpy as np

# The tutorial's vocabulary, verbatim: ASCII chars that occur in Shakespeare and Dickens.
TUTORIAL_VOCAB = (
    "dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r"
)
assert len(TUTORIAL_VOCAB) == 86 and len(set(TUTORIAL_VOCAB)) == 86

PAD_ID = 86  # padding: inputs may hold it, targets equal to it are masked out
OOV_ID = 87  # any character outside TUTORIAL_VOCAB
VOCAB_SIZE = 88  # rows of the embedding / columns of the output layer
SPECIAL_TOKENS = {"<pad>": PAD_ID, "<oov>": OOV_ID}

STOI: dict[str, int] = {c: i for i, c in enumerate(TUTORIAL_VOCAB)}
ITOS: list[str] = list(TUTORIAL_VOCAB) + ["\u2400", "\ufffd"]  # printable stand-ins: ␀ and �

# Byte -> id table: the tutorial splits snippets into bytes, so non-ASCII text is several OOVs
# there; we encode per Unicode character instead (one OOV per unknown character).
_ASCII_TABLE = np.full(128, OOV_ID, dtype=np.uint8)
for _c, _i in STOI.items():
    _ASCII_TABLE[ord(_c)] = _i


def encode(text: str) -> np.ndarray:
    """Characters -> ids (uint8). Unknown characters become OOV_ID."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = np.full(codes.shape, OOV_ID, dtype=np.uint8)
    ascii_ = codes < 128
    ids[ascii_] = _ASCII_TABLE[codes[ascii_]]
    return ids


def decode(ids) -> str:
    """Ids -> text. PAD and OOV decode to visible stand-ins."""
    return "".join(ITOS[int(i)] for i in ids)


def unknown_chars(text: str) -> dict[str, int]:
    """Characters of `text` outside the vocabulary, with their counts."""
    out: dict[str, int] = {}
    for c in text:
        if c not in STOI:
            out[c] = out.get(c, 0) + 1
    return out
