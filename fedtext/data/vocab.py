"""Vocabularies as values: characters plus special ids, one frozen `Vocab` per task.

A vocabulary is data, not a set of module constants: a task, a checkpoint and a model each
carry theirs, and code asks the value (`vocab.pad_id`, `vocab.size`) instead of assuming 88.

    TUTORIAL   the tutorial's 86 characters as ids 0..85 (its `vocab` list, in its order),
               then PAD = 86 (padding, never a counted target) and OOV = 87 (any character
               outside the 86; the tutorial silently maps those to id 0, 'd'). Size 88.
    KERAS      the tutorial's Keras model: the same 86 characters and nothing else (size 86).
    REDDI2021  TFF's `tff.simulation.baselines.shakespeare` task (Reddi et al. 2021): PAD = 0,
               the same 86 characters as ids 1..86, OOV = 87, BOS = 88, EOS = 89. Size 90.
               (char_prediction_preprocessing.get_special_tokens: pad 0, oov len+1, bos
               len+2, eos len+3; `lookup(chars) + 1  # Reserve 0 for pad`.)

The packed client store (fedtext.data.store) always holds TUTORIAL ids (uint8); a task whose
vocabulary differs maps them with `Vocab.from_store_table` (one 256-entry lookup).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from fedtext.errors import FedtextError

# The tutorial's vocabulary, verbatim: ASCII chars that occur in Shakespeare and Dickens.
TUTORIAL_CHARS = (
    "dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r"
)
assert len(TUTORIAL_CHARS) == 86 and len(set(TUTORIAL_CHARS)) == 86

# Printable stand-ins for the special ids when decoding (␀ pad, � oov, ⟨ bos, ⟩ eos).
_SHOWN = {"pad": "\u2400", "oov": "\ufffd", "bos": "\u27e8", "eos": "\u27e9"}
SPECIALS = ("pad", "oov", "bos", "eos")


@dataclass(frozen=True)
class Vocab:
    """Characters with ids first_id .. first_id + len(chars) - 1, plus optional special ids.

    Example:
        >>> v = Vocab("ab", first_id=1, pad_id=0, oov_id=3)
        >>> v.size, v.encode("abz").tolist(), v.decode([1, 2, 0])
        (4, [1, 2, 3], 'ab\u2400')
    """

    chars: str
    first_id: int = 0
    pad_id: int | None = None  # padding: inputs may hold it, targets equal to it never count
    oov_id: int | None = None  # unknown characters; None = unknown characters are an error
    bos_id: int | None = None  # beginning of a snippet (the Reddi et al. task)
    eos_id: int | None = None  # end of a snippet
    _stoi: dict = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        if len(set(self.chars)) != len(self.chars) or not self.chars:
            raise ValueError("a vocabulary needs distinct characters")
        taken = set(range(self.first_id, self.first_id + len(self.chars)))
        for name in SPECIALS:
            i = getattr(self, f"{name}_id")
            if i is None:
                continue
            if i < 0 or i in taken:
                raise ValueError(f"{name}_id {i} collides with another id")
            taken.add(i)
        if self.first_id < 0 or max(taken) + 1 != len(taken) or len(taken) > 256:
            raise ValueError("vocabulary ids must be 0..size-1 without gaps, size <= 256")
        object.__setattr__(self, "_stoi", {c: self.first_id + i for i, c in enumerate(self.chars)})

    @property
    def size(self) -> int:
        """Rows of the embedding / columns of the output layer."""
        return len(self.chars) + sum(getattr(self, f"{n}_id") is not None for n in SPECIALS)

    @property
    def fill_id(self) -> int:
        """What pads inputs and masked targets: PAD, or id 0 for a vocabulary without one
        (the mask keeps it from counting; a causal RNN never reads padding back)."""
        return self.pad_id if self.pad_id is not None else 0

    @property
    def stoi(self) -> dict[str, int]:
        """character -> id (a copy)."""
        return dict(self._stoi)

    @property
    def itos(self) -> list[str]:
        """id -> the character, or a printable stand-in for a special id."""
        out = [""] * self.size
        for c, i in self._stoi.items():
            out[i] = c
        for name in SPECIALS:
            if (i := getattr(self, f"{name}_id")) is not None:
                out[i] = _SHOWN[name]
        return out

    def encode(self, text: str) -> np.ndarray:
        """Characters -> ids (uint8). Unknown characters become oov_id (or raise without one)."""
        if self.oov_id is None and (bad := self.unknown_chars(text)):
            raise FedtextError(f"characters outside the vocabulary: {_show(bad)}")
        oov = 0 if self.oov_id is None else self.oov_id
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = self._ascii_table(oov)
        ids = np.full(codes.shape, oov, dtype=np.uint8)
        ascii_ = codes < 128
        ids[ascii_] = table[codes[ascii_]]
        for j in np.flatnonzero(~ascii_):  # non-ASCII characters that are in the vocabulary
            ids[j] = self._stoi.get(chr(codes[j]), oov)
        return ids

    def _ascii_table(self, oov: int) -> np.ndarray:
        table = np.full(128, oov, dtype=np.uint8)
        for c, i in self._stoi.items():
            if ord(c) < 128:
                table[ord(c)] = i
        return table

    def decode(self, ids) -> str:
        """Ids -> text; special ids decode to visible stand-ins."""
        itos = self.itos
        return "".join(itos[int(i)] for i in ids)

    def unknown_chars(self, text: str) -> dict[str, int]:
        """Characters of `text` outside the vocabulary, with their counts."""
        out: dict[str, int] = {}
        for c in text:
            if c not in self._stoi:
                out[c] = out.get(c, 0) + 1
        return out

    def from_store_table(self) -> np.ndarray:
        """(256,) uint8: TUTORIAL id (what the client store holds) -> this vocabulary's id."""
        table = np.full(256, self.oov_id if self.oov_id is not None else 0, dtype=np.uint8)
        for i, c in enumerate(TUTORIAL.chars):
            if c in self._stoi:
                table[i] = self._stoi[c]
        return table

    def record(self) -> dict:
        """What a checkpoint's config.json stores (Vocab.from_record reads it back)."""
        return {"chars": self.chars, "first_id": self.first_id, "pad_id": self.pad_id,
                "oov_id": self.oov_id, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "size": self.size}

    @classmethod
    def from_record(cls, rec) -> Vocab:
        """Inverse of `record` (also reads fedtext 0.1's {"chars", "pad_id", "oov_id", "size"}).

        Raises:
            ValueError: not a valid vocabulary record.
        """
        if not isinstance(rec, dict) or not isinstance(rec.get("chars"), str):
            raise ValueError("a vocabulary record needs a 'chars' string")
        ids = {k: rec.get(k) for k in ("first_id", "pad_id", "oov_id", "bos_id", "eos_id")}
        for k, v in ids.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"vocabulary {k} must be an integer, not {v!r}")
        vocab = cls(rec["chars"], **{k: v for k, v in ids.items() if k != "first_id"},
                    first_id=ids["first_id"] or 0)
        if rec.get("size", vocab.size) != vocab.size:
            raise ValueError(f"vocabulary size {rec['size']} != {vocab.size} ids it defines")
        return vocab


def _show(counts: dict[str, int]) -> str:
    return ", ".join(f"{c!r} (x{n})" if n > 1 else repr(c) for c, n in counts.items())


TUTORIAL = Vocab(TUTORIAL_CHARS, pad_id=86, oov_id=87)
KERAS = Vocab(TUTORIAL_CHARS)
REDDI2021 = Vocab(TUTORIAL_CHARS, first_id=1, pad_id=0, oov_id=87, bos_id=88, eos_id=89)

# The store's encoding (fedtext.data.store): TUTORIAL ids, one byte per character.
PAD_ID, OOV_ID = TUTORIAL.pad_id, TUTORIAL.oov_id
STOI = MappingProxyType(TUTORIAL.stoi)  # read-only views of TUTORIAL's tables
ITOS = tuple(TUTORIAL.itos)
encode, decode, unknown_chars = TUTORIAL.encode, TUTORIAL.decode, TUTORIAL.unknown_chars
