"""Aggregators: many weighted client deltas in, one delta out (FedJAX's `Aggregator`).

    state = agg.init(params)
    delta_mean, state = agg.aggregate([(delta, weight), ...], state)

Like the server optimizers, an aggregator is a pair of pure functions with its state as a
value. `mean()` is FedAvg's weighted average; `clipped_mean(max_norm)` first scales every
client delta down to an L2 norm of at most `max_norm` (the clipping stage of DP-FedAvg, and a
cheap guard against one client dominating a round).

How much each client weighs is decided by `client_weight(metrics, weighting)`:

    "tokens"    counted target characters (default: every character counts the same, as in
                centralized training on the union of the clients' data)
    "examples"  sequences with at least one counted target (TFF's ClientWeighting.NUM_EXAMPLES,
                what the tutorial uses)
    "uniform"   1.0 per client (the tutorial's `client_weight_fn=lambda _: 1.0`)
    a callable  metrics dict -> float (the tutorial's `client_weight_fn`)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from fedtext import params as P
from fedtext.errors import FedtextError
from fedtext.params import Params

Weighting = str | Callable[[dict], float]
WEIGHTINGS = ("tokens", "examples", "uniform")


class Aggregator(NamedTuple):
    """A pair of pure functions.

    init(params) -> state
    aggregate([(delta, weight), ...], state) -> (aggregated delta, new state); inputs untouched.

    Example:
        >>> import torch
        >>> from fedtext import aggregators
        >>> agg = aggregators.mean()
        >>> state = agg.init({"w": torch.zeros(1)})
        >>> delta, state = agg.aggregate(
        ...     [({"w": torch.tensor([1.0])}, 3.0), ({"w": torch.tensor([-1.0])}, 1.0)], state)
        >>> delta["w"].item()
        0.5
    """

    init: Callable[[Params], Any]
    aggregate: Callable[[Sequence[tuple[Params, float]], Any], tuple[Params, Any]]


class MeanState(NamedTuple):
    rounds: int  # aggregations done


def mean() -> Aggregator:
    """Weighted mean sum_i w_i delta_i / sum_i w_i (McMahan et al. 2017, Algorithm 1)."""

    def init(params):
        del params
        return MeanState(0)

    def aggregate(deltas_and_weights, state):
        deltas, weights = zip(*deltas_and_weights)
        return P.weighted_mean(deltas, weights), MeanState(state.rounds + 1)

    return Aggregator(init, aggregate)


class ClippedMeanState(NamedTuple):
    rounds: int  # aggregations done
    clipped: int  # client deltas scaled down so far, over all rounds


def clipped_mean(max_norm: float) -> Aggregator:
    """Clip each client delta to global L2 norm <= max_norm, then take the weighted mean.

    Args:
        max_norm: the clipping bound C (> 0).
    """
    if not max_norm > 0:
        raise FedtextError(f"max_norm must be > 0, got {max_norm}")

    def init(params):
        del params
        return ClippedMeanState(0, 0)

    def aggregate(deltas_and_weights, state):
        deltas, weights, clipped = [], [], 0
        for delta, w in deltas_and_weights:
            d, norm = P.clip_by_global_norm(delta, max_norm)
            deltas.append(d)
            weights.append(w)
            clipped += norm > max_norm
        return P.weighted_mean(deltas, weights), ClippedMeanState(
            state.rounds + 1, state.clipped + clipped)

    return Aggregator(init, aggregate)


def client_weight(metrics: dict, weighting: Weighting = "tokens") -> float:
    """The weight of one client's delta, from its training metrics (see the module docstring).

    Args:
        metrics: a `ClientResult.metrics` dict (needs "count" and "num_examples").
        weighting: "tokens", "examples", "uniform", or a callable metrics -> float.
    """
    if callable(weighting):
        w = float(weighting(metrics))
    elif weighting == "tokens":
        w = float(metrics["count"])
    elif weighting == "examples":
        w = float(metrics["num_examples"])
    elif weighting == "uniform":
        w = 1.0
    else:
        raise FedtextError(f"weighting must be one of {WEIGHTINGS} or a callable, "
                           f"got {weighting!r}")
    if not w >= 0:  # also catches NaN
        raise FedtextError(f"client weight must be >= 0, got {w}")
    return w
