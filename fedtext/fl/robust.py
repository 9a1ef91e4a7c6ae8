"""Robust aggregators: one delta out of n client deltas when some of the clients lie.

Each is an `Aggregator(init, aggregate)` (fedtext.fl.aggregators) that needs the whole round
at once, so it stacks the n deltas as rows of one (n, D) matrix (D = the number of
parameters; 30 clients of the 4M-parameter tutorial model are 480 MB). f is the number of
Byzantine (arbitrarily bad) clients among the n of a round.

    median()            coordinate-wise median (Yin et al. 2018, "Byzantine-Robust
                        Distributed Learning: Towards Optimal Statistical Rates"; Flower's
                        FedMedian). Tolerates f < n / 2 per coordinate. Unweighted.
    trimmed_mean(beta)  per coordinate, drop the floor(beta n) largest and smallest values,
                        average the rest (Yin et al. 2018; Flower's FedTrimmedAvg).
                        Tolerates f <= floor(beta n). Unweighted.
    krum(f, m=1)        Krum (Blanchard et al. 2017, "Machine Learning with Adversaries:
                        Byzantine Tolerant Gradient Descent"): score each delta by the summed
                        squared distances to its n - f - 2 nearest others, keep the best one;
                        Multi-Krum (m > 1) averages the m best. Needs n > 2f + 2. Unweighted.
    geometric_median()  RFA (Pillutla et al. 2022, "Robust Aggregation for Federated
                        Learning"): the weighted geometric median by the smoothed Weiszfeld
                        algorithm, z <- sum_i a_i x_i / max(nu, |x_i - z|) / sum_i a_i /
                        max(nu, |x_i - z|), from the weighted mean. Breakdown point 1/2 (of
                        the total weight). Uses the client weights.

Ties and even n: the median of an even number of values is the mean of the two middle ones
(as numpy's and Flower's); Krum breaks score ties by the lower client position.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch

from fedtext.errors import FedtextError
from fedtext.fl import params as P
from fedtext.fl.aggregators import Aggregator
from fedtext.fl.params import Params


class RobustState(NamedTuple):
    rounds: int  # aggregations done
    last_selected: tuple[int, ...]  # Krum: the client positions kept last round (else ())


def _stack(deltas_and_weights: Iterable[tuple[Params, float]]):
    """(like, (n, D) float matrix of the flattened deltas, (n,) weights)."""
    like, rows, weights = None, [], []
    for delta, w in deltas_and_weights:
        like = like or delta
        rows.append(P.flatten(delta))
        weights.append(float(w))
    if not rows:
        raise FedtextError("nothing to aggregate: no client delta")
    return like, torch.stack(rows), torch.tensor(weights, dtype=torch.float64)


def _out(vec: torch.Tensor, like: Params) -> Params:
    return {k: v.clone() for k, v in P.unflatten(vec.contiguous(), like).items()}


def _init(params):
    del params
    return RobustState(0, ())


def median() -> Aggregator:
    """Coordinate-wise median of the deltas (module docstring)."""
    def aggregate(deltas_and_weights, state):
        like, X, _ = _stack(deltas_and_weights)
        n = X.shape[0]
        s = X.sort(dim=0).values
        mid = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
        return _out(mid, like), RobustState(state.rounds + 1, ())

    return Aggregator(_init, aggregate)


def trimmed_mean(beta: float) -> Aggregator:
    """Coordinate-wise beta-trimmed mean (module docstring).

    Args:
        beta: the fraction trimmed from each end, in [0, 0.5).
    """
    if not 0 <= beta < 0.5:
        raise FedtextError(f"trim fraction must be in [0, 0.5), got {beta}")

    def aggregate(deltas_and_weights, state):
        like, X, _ = _stack(deltas_and_weights)
        n = X.shape[0]
        k = math.floor(beta * n)
        s = X.sort(dim=0).values
        return _out(s[k:n - k].mean(dim=0), like), RobustState(state.rounds + 1, ())

    return Aggregator(_init, aggregate)


def krum(f: int, m: int | None = 1) -> Aggregator:
    """Krum (m = 1) or Multi-Krum (m > 1): see the module docstring.

    Args:
        f: the number of Byzantine clients to tolerate.
        m: how many of the best-scoring deltas to average; None = n - f (El Mhamdi et al.
            2018's choice for Multi-Krum).
    """
    if f < 0 or (m is not None and m < 1):
        raise FedtextError(f"krum needs f >= 0 and m >= 1, got f={f}, m={m}")

    def aggregate(deltas_and_weights, state):
        like, X, _ = _stack(deltas_and_weights)
        n = X.shape[0]
        if n <= 2 * f + 2:
            raise FedtextError(f"krum with f={f} needs more than 2f + 2 = {2 * f + 2} clients "
                               f"in a round, got {n}")
        Xd = X.double()
        sq = (Xd * Xd).sum(1)
        d2 = (sq[:, None] + sq[None, :] - 2 * Xd @ Xd.T).clamp(min=0)  # (n, n) squared distances
        d2.fill_diagonal_(float("inf"))
        nearest = d2.sort(dim=1).values[:, :n - f - 2]  # each row's n - f - 2 closest others
        scores = nearest.sum(1)
        order = sorted(range(n), key=lambda i: (float(scores[i]), i))
        keep = order[:min(n - f if m is None else m, n)]
        return _out(X[keep].mean(dim=0), like), RobustState(state.rounds + 1, tuple(keep))

    return Aggregator(_init, aggregate)


def geometric_median(iters: int = 10, nu: float = 1e-6, tol: float = 1e-7) -> Aggregator:
    """RFA's weighted geometric median by smoothed Weiszfeld (module docstring).

    Args:
        iters: at most this many Weiszfeld steps (RFA reports 3-4 suffice).
        nu: the smoothing: distances below nu count as nu (no division by zero).
        tol: stop when the objective improves by less than this fraction.
    """
    if iters < 1 or not nu > 0:
        raise FedtextError(f"geometric median needs iters >= 1 and nu > 0, got {iters}, {nu}")

    def aggregate(deltas_and_weights, state):
        like, X, w = _stack(deltas_and_weights)
        if not w.sum() > 0:
            raise FedtextError("every client has weight 0: nothing to average")
        a = (w / w.sum()).to(X.dtype)
        z = (a[:, None] * X).sum(0)  # start from the weighted mean
        last = math.inf
        for _ in range(iters):
            dist = (X - z).norm(dim=1).clamp(min=nu)  # (n,)
            objective = float((a * dist).sum())
            if last - objective <= tol * objective:
                break
            last = objective
            beta = a / dist
            z = (beta[:, None] * X).sum(0) / beta.sum()
        return _out(z, like), RobustState(state.rounds + 1, ())

    return Aggregator(_init, aggregate)
