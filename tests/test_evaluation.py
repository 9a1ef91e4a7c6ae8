import numpy as np
import pytest
import torch

from fedtext import params as P
from fedtext.batching import Batch
from fedtext.client import ClientConfig, client_update
from fedtext.errors import FedtextError
from fedtext.evaluation import evaluate, federated_evaluate
from fedtext.model import CharRNN, ModelConfig, token_stats

MC = ModelConfig(vocab_size=12, embed_dim=8, hidden_size=16)


def _batch(seed, B=4, T=6, counted=0.8):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randint(0, 12, (B, T), generator=g),
                 torch.randint(0, 12, (B, T), generator=g),
                 torch.rand(B, T, generator=g) < counted)


def _model():
    torch.manual_seed(0)
    return CharRNN(MC)


def test_evaluate_module_and_params_agree_with_token_stats():
    model = _model()
    batches = [_batch(1), _batch(2)]
    loss_sum = correct = count = 0.0
    with torch.no_grad():
        for b in batches:
            ls, c, n = token_stats(model(b.x)[0], b.y, b.mask)
            loss_sum, correct, count = loss_sum + ls.item(), correct + c.item(), count + n.item()
    for m in (evaluate(model, batches), evaluate(model.state_dict(), batches, MC)):
        assert m["count"] == count and m["correct"] == correct and m["num_batches"] == 2
        assert m["loss"] == pytest.approx(loss_sum / count, rel=1e-6)
        assert m["accuracy"] == correct / count
    assert model.training  # evaluate() puts the mode back
    with pytest.raises(FedtextError):
        evaluate(model.state_dict(), batches)


def test_evaluation_is_the_pre_step_training_metric():
    model = _model()
    b = _batch(3)
    trained = client_update(P.clone(model.state_dict()), [b], ClientConfig(MC), seed=0).metrics
    assert evaluate(model, [b])["loss"] == pytest.approx(trained["loss"], rel=1e-6)


def test_federated_evaluate_weighted_unweighted_percentiles():
    model = _model()
    clients = [("a", [_batch(1), _batch(2)]), ("b", [_batch(3, counted=0.3)]),
               ("c", [_batch(4)]), ("empty", [_batch(5, counted=0.0)])]
    r = federated_evaluate(model.state_dict(), clients, ClientConfig(MC))
    per = {c["client_id"]: c for c in r["client_metrics"]}
    assert list(per) == ["a", "b", "c", "empty"] and r["clients"] == 4
    for cid, batches in clients[:3]:
        assert per[cid]["loss"] == pytest.approx(evaluate(model, batches)["loss"], rel=1e-6)
    assert per["empty"]["count"] == 0 and np.isnan(per["empty"]["loss"])
    losses = [per[c]["loss"] for c in "abc"]
    # Pooled: every character weighs the same; unweighted: every client (with data) does.
    total = sum(per[c]["loss_sum"] for c in "abc")
    assert r["loss"] == pytest.approx(total / sum(per[c]["count"] for c in "abc"), rel=1e-9)
    assert r["unweighted_loss"] == pytest.approx(np.mean(losses), rel=1e-9)
    assert r["loss"] != pytest.approx(r["unweighted_loss"], rel=1e-6)
    assert r["loss_percentiles"][50] == pytest.approx(np.median(losses), rel=1e-9)
    assert r["accuracy_percentiles"][90] <= max(per[c]["accuracy"] for c in "abc")
