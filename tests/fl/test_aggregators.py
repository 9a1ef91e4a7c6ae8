
import pytest
import torch

from fedtext.errors import FedtextError
from fedtext.fl import aggregators as A
from fedtext.fl import params as P


def _d(*v):
    return {"w": torch.tensor(v, dtype=torch.float64)}


def test_mean_is_weighted_mean():
    agg = A.mean()
    state = agg.init(_d(0.0, 0.0))
    delta, state = agg.aggregate([(_d(1.0, 2.0), 3.0), (_d(-3.0, 2.0), 1.0)], state)
    assert delta["w"].tolist() == [0.0, 2.0]  # (3 * [1, 2] + [-3, 2]) / 4
    assert state == A.MeanState(1, 0)


def test_mean_streams_and_matches_the_stacked_weighted_mean():
    g = torch.Generator().manual_seed(0)
    deltas = [{"a": torch.randn(50, generator=g), "b": torch.randn(3, 4, generator=g)}
              for _ in range(7)]
    weights = [float(w) for w in range(1, 8)]
    held = []

    def stream():  # a generator: the aggregator must take one delta at a time
        for d, w in zip(deltas, weights):
            held.append(d)
            yield d, w

    agg = A.mean()
    out, _ = agg.aggregate(stream(), agg.init(deltas[0]))
    ref = P.weighted_mean(deltas, weights)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-6, atol=1e-7)
    assert len(held) == 7


def test_mean_refuses_nothing_and_zero_weights():
    agg = A.mean()
    with pytest.raises(FedtextError, match="no client"):
        agg.aggregate(iter([]), agg.init(_d(0.0)))
    with pytest.raises(FedtextError, match="weight 0"):
        agg.aggregate([(_d(1.0), 0.0)], agg.init(_d(0.0)))


def test_norm_bound_clips_each_client_before_averaging():
    agg = A.mean(clip_norm=1.0)
    state = agg.init(_d(0.0, 0.0))
    # client 0 has norm 5 -> scaled to [0.6, 0.8]; client 1 (norm 0.5) is left alone.
    delta, state = agg.aggregate([(_d(3.0, 4.0), 1.0), (_d(0.0, -0.5), 1.0)], state)
    assert delta["w"].tolist() == pytest.approx([0.3, 0.15], abs=1e-15)
    assert state == A.MeanState(rounds=1, clipped=1)
    with pytest.raises(FedtextError):
        A.mean(0.0)
    built = A.build(A.AggregatorConfig(name="norm-bound", clip_norm=1.0))
    again, _ = built.aggregate([(_d(3.0, 4.0), 1.0), (_d(0.0, -0.5), 1.0)], built.init(_d(0, 0)))
    assert torch.equal(again["w"], delta["w"])
    with pytest.raises(FedtextError, match="needs clip_norm"):
        A.build(A.AggregatorConfig(name="norm-bound"))


METRICS = {"count": 700, "num_examples": 8, "num_batches": 1}


@pytest.mark.parametrize("weighting,expected", [
    ("tokens", 700.0), ("examples", 8.0), ("uniform", 1.0),
    (lambda m: m["num_batches"] * 2.5, 2.5),  # the tutorial's client_weight_fn
])
def test_client_weight(weighting, expected):
    assert A.client_weight(METRICS, weighting) == expected


def test_client_weight_rejects_bad_input():
    with pytest.raises(FedtextError, match="weighting"):
        A.client_weight(METRICS, "chars")
    with pytest.raises(FedtextError, match=">= 0"):
        A.client_weight(METRICS, lambda m: -1.0)
    with pytest.raises(FedtextError, match=">= 0"):
        A.client_weight(METRICS, lambda m: float("nan"))
