"""The tutorial vocabulary: ids, specials, encode/decode."""

import numpy as np

from fedtext import vocab


def test_tutorial_ids_and_specials():
    assert len(vocab.TUTORIAL_VOCAB) == 86
    assert vocab.STOI["d"] == 0 and vocab.STOI["\r"] == 85  # the tutorial's first and last
    assert (vocab.PAD_ID, vocab.OOV_ID, vocab.VOCAB_SIZE) == (86, 87, 88)
    assert len(vocab.ITOS) == vocab.VOCAB_SIZE


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
