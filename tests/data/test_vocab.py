"""Vocabularies as values: the tutorial's ids, specials, encode/decode, records."""

import numpy as np
import pytest

from fedtext.data import vocab
from fedtext.data.vocab import KERAS, TUTORIAL, Vocab
from fedtext.errors import FedtextError


def test_tutorial_ids_and_specials():
    assert len(vocab.TUTORIAL_CHARS) == 86
    assert vocab.STOI["d"] == 0 and vocab.STOI["\r"] == 85  # the tutorial's first and last
    assert (TUTORIAL.pad_id, TUTORIAL.oov_id, TUTORIAL.size) == (86, 87, 88)
    assert (vocab.PAD_ID, vocab.OOV_ID) == (86, 87)
    assert len(vocab.ITOS) == TUTORIAL.size
    assert KERAS.size == 86 and KERAS.pad_id is None and KERAS.fill_id == 0


def test_a_vocabulary_with_bos_eos_and_pad_first():
    # Reddi et al.'s TFF task: PAD 0, the 86 chars 1..86, OOV 87, BOS 88, EOS 89.
    v = Vocab(vocab.TUTORIAL_CHARS, first_id=1, pad_id=0, oov_id=87, bos_id=88, eos_id=89)
    assert v.size == 90 and v.encode("d\r\u00e9").tolist() == [1, 86, 87]
    assert v.decode([0, 88, 1, 89]) == "\u2400\u27e8d\u27e9"
    table = v.from_store_table()  # store (TUTORIAL) ids -> v's ids
    assert table[TUTORIAL.encode("dhl\u00e9")].tolist() == [1, 2, 3, 87]
    assert Vocab.from_record(v.record()) == v and v != TUTORIAL


@pytest.mark.parametrize("kw", [dict(pad_id=0), dict(pad_id=87, oov_id=87),
                                dict(pad_id=90), dict(first_id=-1)])
def test_bad_vocabularies(kw):
    with pytest.raises(ValueError):
        Vocab(vocab.TUTORIAL_CHARS, **kw)


def test_records_of_fedtext_0_1_still_read():
    old = {"chars": vocab.TUTORIAL_CHARS, "pad_id": 86, "oov_id": 87, "size": 88}
    assert Vocab.from_record(old) == TUTORIAL
    with pytest.raises(ValueError, match="size"):
        Vocab.from_record({**old, "size": 90})


def test_without_oov_unknown_characters_are_an_error():
    with pytest.raises(FedtextError, match="outside the vocabulary"):
        KERAS.encode("caf\u00e9")


def test_encode_decode_round_trip():
    text = "To be, or not to be: that is the question.\nHAMLET"
    ids = vocab.encode(text)
    assert ids.dtype == np.uint8 and len(ids) == len(text)
    assert vocab.decode(ids) == text
    assert [vocab.ITOS[i] for i in ids[:2]] == ["T", "o"]


def test_unknown_chars_are_one_oov_each():
    ids = vocab.encode("a\u00e9b\u2014c")  # é and an em dash: one OOV per character, not per byte
    assert list(ids) == [vocab.STOI["a"], 87, vocab.STOI["b"], 87, vocab.STOI["c"]]
    assert vocab.unknown_chars("a\u00e9\u00e9\u2014") == {"\u00e9": 2, "\u2014": 1}
    assert vocab.decode([vocab.PAD_ID, vocab.OOV_ID]) == "\u2400\ufffd"


def test_empty():
    assert vocab.encode("").shape == (0,) and vocab.decode([]) == ""
