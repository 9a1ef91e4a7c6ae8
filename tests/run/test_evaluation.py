"""The one evaluation: hand-computed loss and accuracy, masking, regrouping, random text,
per-client sums and their distribution, and agreement with the training metrics."""

import math

import numpy as np
import pytest
import torch

from fedtext.data.batching import Batch, client_batches, random_text_batches
from fedtext.data.store import ClientStore
from fedtext.data.tasks import TASKS, DataConfig
from fedtext.data.vocab import PAD_ID, STOI, encode
from fedtext.errors import FedtextError
from fedtext.fl import params as P
from fedtext.fl.client import ClientConfig, client_update
from fedtext.model.char_rnn import CharRNN, ModelConfig
from fedtext.run.evaluation import (
    EvalConfig,
    EvalSet,
    build_eval_set,
    client_sums,
    evaluate,
    evaluate_batches,
    evaluate_client,
    summarize,
)

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


def test_eval_set_keeps_every_counted_row():
    b = hand_batch()  # its third row has nothing counted and is dropped
    es = EvalSet.from_batches([[b, b], [b]], ["a", "b"])
    assert len(es.x) == 6 and es.client.tolist() == [0, 0, 0, 0, 1, 1]
    assert es.chars == 3 * int(b.mask.sum())
    with pytest.raises(FedtextError, match="no text"):
        EvalSet.from_batches([[Batch(b.x, b.y, torch.zeros_like(b.mask))]], ["a"])


def test_random_text_accuracy_is_about_one_in_86():
    # The tutorial's sanity check: no model can beat chance on uniformly random text.
    torch.manual_seed(0)
    r = evaluate_batches(CharRNN(TINY), random_text_batches(50, 8, 100, seed=0))
    assert r.predictions == 50 * 8 * 100
    assert abs(r.accuracy - 1 / 86) < 0.005  # ~9 standard errors at 40k predictions
    assert r.loss > math.log(86) - 0.05  # and no better than uniform in loss either


def test_build_eval_set_pools_clients_and_checks_ids():
    store = ClientStore.from_texts({"A": ["ee" * 60], "B": ["ae" * 7], "C": ["x"]},
                                   left_out=("D",))
    model = constant_model(STOI["e"])
    task, cfg = TASKS["tutorial"], DataConfig(batch_size=2, seq_len=10)
    es = build_eval_set(store, ["A", "B"], task, cfg)
    r = evaluate(model, es)
    # 11-char chunks: A has 120 chars (10 full chunks + 10), B 14 (11 + 3)
    assert r["eval_chars"] == (10 * 10 + 9) + (10 + 2) and r["eval_clients"] == 2
    only_a = evaluate(model, build_eval_set(store, ["A"], task, cfg))
    # A is all 'e', so the 'e' model is right on every one of its targets
    assert only_a["eval_chars"] == 109 and only_a["eval_accuracy"] == pytest.approx(1.0)
    with pytest.raises(FedtextError, match="'Z'"):
        build_eval_set(store, ["A", "Z"], task, cfg)
    with pytest.raises(FedtextError, match="left out.*fewer than 2 snippets"):
        build_eval_set(store, ["D"], task, cfg)


def test_per_client_sums_weighted_unweighted_percentiles():
    torch.manual_seed(0)
    model = CharRNN(TINY)
    g = torch.Generator().manual_seed(0)
    clients = {c: [Batch(torch.randint(0, 86, (4, 6), generator=g),
                         torch.randint(0, 86, (4, 6), generator=g),
                         torch.rand(4, 6, generator=g) < frac)]
               for c, frac in (("a", 0.9), ("b", 0.3), ("c", 0.7))}
    es = EvalSet.from_batches(clients.values(), list(clients))
    sums = client_sums(model, es, rows=3)
    row = summarize(sums)
    per = {c: evaluate_batches(model, b) for c, b in clients.items()}
    for i, c in enumerate(clients):  # each client's sums = that client evaluated alone
        assert sums[2, i] == per[c].predictions
        assert float(sums[0, i] / sums[2, i]) == pytest.approx(per[c].loss, rel=1e-6)
    pooled = evaluate_batches(model, [b for bs in clients.values() for b in bs])
    assert row["eval_loss"] == pytest.approx(pooled.loss, rel=1e-6)  # weighted: per char
    accs = [per[c].accuracy for c in clients]
    assert row["eval_unweighted_accuracy"] == pytest.approx(np.mean(accs))  # per client
    assert row["eval_accuracy_p50"] == pytest.approx(np.median(accs))
    assert row["eval_accuracy_p10"] <= row["eval_accuracy_p50"] <= row["eval_accuracy_p90"]
    assert model.training  # evaluation puts the mode back


def test_evaluation_is_the_pre_step_training_metric():
    mc = ModelConfig(vocab_size=12, embed_dim=8, hidden_size=16)
    torch.manual_seed(0)
    model = CharRNN(mc)
    g = torch.Generator().manual_seed(3)
    b = Batch(torch.randint(0, 12, (4, 6), generator=g), torch.randint(0, 12, (4, 6), generator=g),
              torch.rand(4, 6, generator=g) < 0.8)
    trained = client_update(P.clone(model.state_dict()), [b], ClientConfig(model=mc),
                            seed=0).metrics
    assert evaluate_batches(model, [b]).loss == pytest.approx(trained["loss"], rel=1e-6)
    sums = evaluate_client(model.state_dict(), [b], ClientConfig(model=mc), seed=0)
    assert sums["count"] == trained["count"] and sums["correct"] == trained["correct"]
    assert sums["loss_sum"] == pytest.approx(trained["loss_sum"], rel=1e-6)


def test_eval_config_due_and_off():
    assert [r for r in range(8) if EvalConfig(every=3).due(r, 7)] == [0, 3, 6, 7]
    assert not any(EvalConfig(every=0).due(r, 7) for r in range(8))
    with pytest.raises(FedtextError):
        EvalConfig(every=-1)
