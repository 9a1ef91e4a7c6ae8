"""Aggregators: many weighted client deltas in, one delta out (FedJAX's `Aggregator`).

    state = agg.init(params)
    delta_mean, state = agg.aggregate(iter([(delta, weight), ...]), state)

Like the server optimizers, an aggregator is a pair of pure functions with its state as a
value. The deltas arrive as an iterable, in client order; `mean()` consumes it as it comes
(a running weighted sum), so a round holds one delta at a time, however many clients it has.

    mean()                FedAvg's weighted average
    mean(clip_norm=C)     first scales every client delta down to an L2 norm of at most C
                          (norm bounding: the clipping stage of DP-FedAvg, and a cheap guard
                          against one client dominating a round); "norm-bound" in configs

How much each client weighs is decided by `client_weight(metrics, weighting)` (WEIGHTINGS):

    "tokens"    counted target characters (default: every character counts the same, as in
                centralized training on the union of the clients' data)
    "examples"  sequences with at least one counted target (TFF's ClientWeighting.NUM_EXAMPLES,
                what the tutorial uses)
    "uniform"   1.0 per client (the tutorial's `client_weight_fn=lambda _: 1.0`)
    a callable  metrics dict -> float (the tutorial's `client_weight_fn`)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from fedtext.errors import FedtextError
from fedtext.fl import params as P
from fedtext.fl.params import Params
from fedtext.registry import Registry

Weighting = str | Callable[[dict], float]

WEIGHTINGS = Registry("weighting")
WEIGHTINGS.register("tokens", lambda m: float(m["count"]))
WEIGHTINGS.register("examples", lambda m: float(m["num_examples"]))
WEIGHTINGS.register("uniform", lambda m: 1.0)


class Aggregator(NamedTuple):
    """A pair of pure functions.

    init(params) -> state
    aggregate(iterable of (delta, weight), state) -> (aggregated delta, new state); the deltas
    come in client order and are never modified.

    Example:
        >>> import torch
        >>> from fedtext.fl import aggregators
        >>> agg = aggregators.mean()
        >>> state = agg.init({"w": torch.zeros(1)})
        >>> delta, state = agg.aggregate(
        ...     [({"w": torch.tensor([1.0])}, 3.0), ({"w": torch.tensor([-1.0])}, 1.0)], state)
        >>> delta["w"].item()
        0.5
    """

    init: Callable[[Params], Any]
    aggregate: Callable[[Iterable[tuple[Params, float]], Any], tuple[Params, Any]]
    # (params, state) -> (delta, state) for a round with no client at all (Poisson sampling
    # can draw none); None: such a round is an error.
    aggregate_empty: Callable[[Params, Any], tuple[Params, Any]] | None = None


class MeanState(NamedTuple):
    rounds: int  # aggregations done
    clipped: int  # client deltas scaled down so far, over all rounds (with clip_norm)


def mean(clip_norm: float | None = None) -> Aggregator:
    """Weighted mean sum_i w_i delta_i / sum_i w_i (McMahan et al. 2017, Algorithm 1), as a
    running sum in client order (one delta held at a time).

    Args:
        clip_norm: if given, each delta is first scaled to global L2 norm <= clip_norm.
    """
    if clip_norm is not None and not clip_norm > 0:
        raise FedtextError(f"clip_norm must be > 0, got {clip_norm}")

    def init(params):
        del params
        return MeanState(0, 0)

    def aggregate(deltas_and_weights, state):
        total, acc, keys, clipped = 0.0, None, None, 0
        for delta, w in deltas_and_weights:
            if not w >= 0:
                raise FedtextError(f"client weights must be >= 0, got {w}")
            if clip_norm is not None:
                delta, norm = P.clip_by_global_norm(delta, clip_norm)
                clipped += norm > clip_norm
            if acc is None:
                keys = list(delta)
                acc = [delta[k] * w for k in keys]  # fresh tensors: the inputs stay untouched
            else:
                torch._foreach_add_(acc, [delta[k] for k in keys], alpha=w)
            total += w
        if acc is None:
            raise FedtextError("nothing to aggregate: no client delta")
        if not total > 0:
            raise FedtextError("every client has weight 0: nothing to average")
        torch._foreach_mul_(acc, 1.0 / total)
        return dict(zip(keys, acc)), MeanState(state.rounds + 1, state.clipped + clipped)

    return Aggregator(init, aggregate)


def client_weight(metrics: dict, weighting: Weighting = "tokens") -> float:
    """The weight of one client's delta, from its training metrics (see the module docstring).

    Args:
        metrics: a `ClientResult.metrics` dict (needs "count" and "num_examples").
        weighting: "tokens", "examples", "uniform", or a callable metrics -> float.
    """
    w = float(weighting(metrics) if callable(weighting) else WEIGHTINGS[weighting](metrics))
    if not (w >= 0 and math.isfinite(w)):  # also catches NaN
        raise FedtextError(f"client weight must be a finite number >= 0, got {w}")
    return w


# ----------------------------------------------------------------------------- [aggregator]

AGGREGATORS = Registry("aggregator")
AGGREGATORS.register("mean", lambda c: mean(c.clip_norm))


def _robust(make):
    def build(c):
        if c.clip_norm is not None:
            raise FedtextError(f"clip_norm goes with the mean (norm-bound), not {c.name}")
        from fedtext.fl import robust  # the robust family, fedtext/fl/robust.py

        return make(robust, c)

    return build


AGGREGATORS.register("median", _robust(lambda r, c: r.median()))
AGGREGATORS.register("trimmed-mean", _robust(lambda r, c: r.trimmed_mean(c.trim_fraction)))
AGGREGATORS.register("krum", _robust(lambda r, c: r.krum(c.krum_f, 1)))
AGGREGATORS.register("multi-krum", _robust(lambda r, c: r.krum(c.krum_f, c.krum_m)))
AGGREGATORS.register("geometric-median", _robust(lambda r, c: r.geometric_median(c.gm_iters)))


@AGGREGATORS.register("norm-bound")
def _norm_bound(c):
    if c.clip_norm is None:
        raise FedtextError("aggregator norm-bound needs clip_norm (--clip-norm C)")
    return mean(c.clip_norm)


@dataclass(frozen=True)
class AggregatorConfig:
    """[aggregator]: how the round's client deltas become one."""

    name: str = field(default="mean", metadata={
        "flag": "aggregator", "choices": AGGREGATORS.names,
        "help": "mean (FedAvg's weighted mean), norm-bound (clip each delta, then mean), or "
        "robust (fedtext/fl/robust.py): median, trimmed-mean, krum, multi-krum, "
        "geometric-median"})
    weighting: str = field(default="tokens", metadata={
        "choices": WEIGHTINGS.names, "help": "client weight in the average: tokens (counted "
        "chars), examples (TFF's NUM_EXAMPLES) or uniform"})
    clip_norm: float | None = field(default=None, metadata={
        "help": "clip every client delta to this L2 norm first (default: no clipping)"})
    trim_fraction: float = field(default=0.1, metadata={
        "help": "trimmed-mean: the fraction of each end trimmed per coordinate"})
    krum_f: int = field(default=1, metadata={
        "help": "krum / multi-krum: the Byzantine clients to tolerate (needs > 2f + 2 "
        "clients a round)"})
    krum_m: int | None = field(default=None, metadata={
        "help": "multi-krum: how many best-scoring deltas to average (default: clients - f)"})
    gm_iters: int = field(default=10, metadata={
        "flag": "gm-iters", "help": "geometric-median: Weiszfeld iterations at most"})

    def __post_init__(self):
        AGGREGATORS.check(self.name, "name")
        WEIGHTINGS.check(self.weighting, "weighting")
        if not 0 <= self.trim_fraction < 0.5:
            raise FedtextError(f"trim_fraction must be in [0, 0.5), not {self.trim_fraction}")
        if self.krum_f < 0:
            raise FedtextError(f"krum_f must be >= 0, not {self.krum_f}")
        if self.krum_m is not None and self.krum_m < 1:
            raise FedtextError(f"krum_m must be >= 1, not {self.krum_m}")
        if self.gm_iters < 1:
            raise FedtextError(f"gm_iters must be >= 1, not {self.gm_iters}")
        if self.clip_norm is not None and not (self.clip_norm > 0 and
                                               math.isfinite(self.clip_norm)):
            raise FedtextError(f"clip_norm must be a finite number > 0, not {self.clip_norm}")


def build(cfg: AggregatorConfig) -> Aggregator:
    """The Aggregator of an [aggregator] table."""
    return AGGREGATORS[cfg.name](cfg)
