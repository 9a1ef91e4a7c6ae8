"""Central evaluation: hand-computed loss and accuracy, masking, regrouping, random text."""

import math

import numpy as np
import pytest
import torch

from fedtext.batching import Batch, client_batches, random_text_batches
from fedtext.errors import FedtextError
from fedtext.evaluate import evaluate_batches, evaluate_store, restack
from fedtext.model import CharRNN, ModelConfig
from fedtext.vocab import PAD_ID, STOI, encode

TINY = ModelConfig(embed_dim=8, hidden_size=16)


def constant_model(favourite: int, strength: float = 3.0) -> CharRNN:
    """A model whose logits ignore the input: head weight 0, bias `strength` at `favourite`."""
    model = CharRNN(TINY)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[favourite] = strength
    return model


def hand_batch() -> Batch:
    # targets: 'e' x3, 'a' x2, 'b' x1 counted; PAD and two masked-out 'e's not counted.
    e, a, b = STOI["e"], STOI["a"], STOI["b"]
    y = torch.tensor([[e, a, e, b], [a, e, PAD_ID, PAD_ID], [e, e, PAD_ID, PAD_ID]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    x = torch.full_like(y, STOI["x"])
    return Batch(x, y, mask)


def test_constant_model_hand_computed():
    e = STOI["e"]
    r = evaluate_batches(constant_model(e), [hand_batch()])
    assert r.predictions == 6
    assert r.accuracy == pytest.approx(3 / 6)
    # softmax over 88 logits, one of them 3: -log p(e) = log(87 + e^3) - 3, else log(87 + e^3)
    z = math.log(87 + math.exp(3.0))
    assert r.loss == pytest.approx((3 * (z - 3) + 3 * z) / 6, rel=1e-6)
    assert r.bits_per_char == pytest.approx(r.loss / math.log(2))


def test_padding_and_masked_targets_are_not_counted():
    model = constant_model(STOI["a"])
    b = hand_batch()
    base = evaluate_batches(model, [b])
    assert base.accuracy == pytest.approx(2 / 6)
    # Extra all-padding rows and columns change nothing.
    pad = torch.full((2, 4), PAD_ID)
    x = torch.cat([torch.cat([b.x, pad]), torch.full((5, 3), PAD_ID)], dim=1)
    y = torch.cat([torch.cat([b.y, pad]), torch.full((5, 3), PAD_ID)], dim=1)
    no = torch.zeros(2, 4, dtype=torch.bool)
    mask = torch.cat([torch.cat([b.mask, no]), torch.zeros(5, 3, dtype=torch.bool)], dim=1)
    r = evaluate_batches(model, [Batch(x, y, mask)])
    assert (r.predictions, r.accuracy) == (base.predictions, base.accuracy)
    assert r.loss == pytest.approx(base.loss, rel=1e-6)
    # No counted target at all: NaN, not a division by zero.
    empty = evaluate_batches(model, [Batch(b.x, b.y, torch.zeros_like(b.mask))])
    assert empty.predictions == 0 and math.isnan(empty.loss)


def test_result_does_not_depend_on_regrouping():
    torch.manual_seed(0)
    model = CharRNN(TINY)
    ids = encode("To be, or not to be, that is the question:\n" * 7)
    batches = client_batches(ids, batch_size=3, seq_len=10, mode="padded")
    ref = evaluate_batches(model, batches, rows=1)
    for rows in (2, 5, 256):
        r = evaluate_batches(model, batches, rows=rows)
        assert r.predictions == ref.predictions == len(ids) - math.ceil(len(ids) / 11)
        assert r.loss == pytest.approx(ref.loss, rel=1e-6)
        assert r.accuracy == pytest.approx(ref.accuracy, abs=1e-12)


def test_restack_keeps_every_counted_row():
    b = hand_batch()  # its third row has nothing counted and is dropped
    out = list(restack([b, b, b], rows=4))
    assert [len(o.x) for o in out] == [4, 2]
    assert sum(int(o.mask.sum()) for o in out) == 3 * int(b.mask.sum())
    # a different seq_len starts a new group instead of failing to concatenate
    short = Batch(b.x[:, :2], b.y[:, :2], b.mask[:, :2])
    assert [o.x.shape for o in restack([b, short], rows=8)] == [(2, 4), (2, 2)]


def test_random_text_accuracy_is_about_one_in_86():
    # The tutorial's sanity check: no model can beat chance on uniformly random text.
    torch.manual_seed(0)
    r = evaluate_batches(CharRNN(TINY), random_text_batches(50, 8, 100, seed=0))
    assert r.predictions == 50 * 8 * 100
    assert abs(r.accuracy - 1 / 86) < 0.005  # ~9 standard errors at 40k predictions
    assert r.loss > math.log(86) - 0.05  # and no better than uniform in loss either


class FakeStore:
    """The two members of fedtext.data's ClientStore that evaluation uses."""

    def __init__(self, texts: dict[str, str]):
        self.texts = texts
        self.client_ids = list(texts)

    def chars(self, client_id: str) -> np.ndarray:
        return encode(self.texts[client_id])


def test_evaluate_store_pools_clients_and_checks_ids():
    store = FakeStore({"A": "ee" * 60, "B": "ae" * 7, "C": "x"})
    model = constant_model(STOI["e"])
    r = evaluate_store(model, store, batch_size=2, seq_len=10)
    # 11-char chunks: A has 120 chars (10 full chunks + 10), B 14 (11 + 3), C 1 (no target)
    assert r.predictions == (10 * 10 + 9) + (10 + 2)
    only_a = evaluate_store(model, store, ["A"], batch_size=2, seq_len=10)
    assert only_a.predictions == 109
    # A is all 'e', so the 'e' model is right on every one of its targets
    assert only_a.accuracy == pytest.approx(1.0)
    assert evaluate_store(model, store, ["A"], batch_size=2, seq_len=10,
                          max_batches=1).predictions == 20
    with pytest.raises(FedtextError, match="'Z'"):
        evaluate_store(model, store, ["A", "Z"])
