"""Which clients train in which round, and the seed each of them gets.

Everything is a pure function of (seed, round): a run resumed from a checkpoint at round r
samples exactly the clients the uninterrupted run would have (FedJAX's
`UniformGetClientSampler`), and `client_seed(seed, round, position)` gives every client the
same seed whichever backend (sequential, Ray, Flower) runs it.

    UniformSampler(client_ids, num_clients_per_round, seed).sample(round)   without replacement
    WeightedSampler(client_ids, num_clients_per_round, weights, seed)       P ~ weights (data size)
    FixedSampler(client_ids).sample(round)                                  the same list each round
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedtext.errors import FedtextError

# Domain tags in the seed words, so that the sampling stream of round r and the seed of a
# client in round r never come from the same SeedSequence entropy.
_SAMPLE, _CLIENT = 0, 1


def round_rng(seed: int, round: int) -> np.random.Generator:
    """The generator that picks the clients of `round`."""
    return np.random.default_rng(np.random.SeedSequence([seed, round, _SAMPLE]))


def client_seed(seed: int, round: int, position: int) -> int:
    """A 31-bit seed for the client at `position` in the round's client list."""
    ss = np.random.SeedSequence([seed, round, _CLIENT, position])
    return int(ss.generate_state(1)[0] >> 1)


def _check(client_ids: Sequence, k: int, seed: int) -> None:
    if not 1 <= k <= len(client_ids):
        raise FedtextError(f"num_clients_per_round must be in [1, {len(client_ids)}] "
                           f"(the number of clients), got {k}")
    if seed < 0:
        raise FedtextError(f"seed must be >= 0, got {seed}")


@dataclass(frozen=True)
class UniformSampler:
    """k distinct clients per round, uniformly at random (McMahan et al.'s C-fraction)."""

    client_ids: Sequence  # every client id, in a fixed order (e.g. sorted)
    num_clients_per_round: int  # the tutorial trains 2 or 3 clients a round
    seed: int = 0

    def __post_init__(self):
        _check(self.client_ids, self.num_clients_per_round, self.seed)

    def sample(self, round: int) -> list:
        idx = round_rng(self.seed, round).choice(
            len(self.client_ids), size=self.num_clients_per_round, replace=False)
        return [self.client_ids[i] for i in idx]


@dataclass(frozen=True)
class WeightedSampler:
    """k distinct clients per round, drawn with probability proportional to `weights` (e.g.
    characters per client) without replacement: each next client is drawn from those left."""

    client_ids: Sequence
    num_clients_per_round: int
    weights: Sequence[float]  # one per client, >= 0; at least k of them > 0
    seed: int = 0

    def __post_init__(self):
        _check(self.client_ids, self.num_clients_per_round, self.seed)
        w = np.asarray(self.weights, dtype=np.float64)
        if w.shape != (len(self.client_ids),) or (w < 0).any() or not np.isfinite(w).all():
            raise FedtextError("weights must be one finite value >= 0 per client")
        if (w > 0).sum() < self.num_clients_per_round:
            raise FedtextError(f"only {(w > 0).sum()} clients have weight > 0, "
                               f"fewer than num_clients_per_round={self.num_clients_per_round}")

    def sample(self, round: int) -> list:
        p = np.asarray(self.weights, dtype=np.float64)
        idx = round_rng(self.seed, round).choice(
            len(self.client_ids), size=self.num_clients_per_round, replace=False, p=p / p.sum())
        return [self.client_ids[i] for i in idx]


@dataclass(frozen=True)
class FixedSampler:
    """The same clients every round, in the given order (the tutorial's first clients)."""

    client_ids: Sequence

    def sample(self, round: int) -> list:
        del round
        return list(self.client_ids)
