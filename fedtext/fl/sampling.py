"""Which clients train in which round, and the seed each of them gets.

Everything is a pure function of (seed, round): a run resumed from a checkpoint at round r
samples exactly the clients the uninterrupted run would have (FedJAX's
`UniformGetClientSampler`), and `client_seed(seed, round, position)` gives every client the
same seed whichever backend (sequential, Ray, Flower) runs it.

    UniformSampler(client_ids, num_clients_per_round, seed).sample(round)   without replacement
    WeightedSampler(client_ids, num_clients_per_round, weights, seed)       P ~ weights (data size)
    PoissonSampler(client_ids, q, seed)       each client independently with probability q
                                              (DP accounting's Poisson subsampling; a round may
                                              be empty)
    FixedSampler(client_ids).sample(round)                                  the same list each round

The [sampling] table (`SamplingConfig`) picks one of SAMPLERS by name; a fixed `clients` list
replaces sampling altogether.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fedtext.errors import FedtextError
from fedtext.registry import Registry

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
class PoissonSampler:
    """Every client joins round r independently with probability q (client order kept)."""

    client_ids: Sequence
    q: float  # inclusion probability: expected clients per round / population
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.q <= 1:
            raise FedtextError(f"Poisson sampling's q must be in (0, 1], got {self.q}")

    @property
    def num_clients_per_round(self) -> float:
        return self.q * len(self.client_ids)  # the expected number

    def sample(self, round: int) -> list:
        take = round_rng(self.seed, round).random(len(self.client_ids)) < self.q
        return [c for c, t in zip(self.client_ids, take) if t]


@dataclass(frozen=True)
class FixedSampler:
    """The same clients every round, in the given order (the tutorial's first clients)."""

    client_ids: Sequence

    def sample(self, round: int) -> list:
        del round
        return list(self.client_ids)


# ----------------------------------------------------------------------------- [sampling]

# name -> (eligible client ids, their sizes in characters, k, seed) -> sampler
SAMPLERS = Registry("sampling")
SAMPLERS.register("uniform", lambda ids, sizes, k, seed: UniformSampler(ids, k, seed))
SAMPLERS.register("weighted", lambda ids, sizes, k, seed: WeightedSampler(ids, k, sizes, seed))
SAMPLERS.register("poisson", lambda ids, sizes, k, seed: PoissonSampler(ids, k / len(ids), seed))


@dataclass(frozen=True)
class SamplingConfig:
    """[sampling]: which clients train in each round."""

    method: str = field(default="uniform", metadata={
        "flag": "sampling", "choices": SAMPLERS.names,
        "help": "how clients are drawn: uniform (exactly K, without replacement), weighted "
        "by their characters, or poisson (each client with probability K / clients)"})
    clients_per_round: int = field(default=10, metadata={
        "metavar": "K", "help": "clients sampled each round (poisson: the expected number)"})
    clients: tuple[str, ...] = field(default=(), metadata={
        "metavar": "ID,...", "help": "comma-separated train client ids to use every round "
        "instead of sampling"})

    def __post_init__(self):
        SAMPLERS.check(self.method, "method")
        if self.clients_per_round < 1:
            raise FedtextError(f"clients_per_round must be >= 1, not {self.clients_per_round}")
        if len(set(self.clients)) != len(self.clients):
            raise FedtextError("clients lists a client twice")


def build(cfg: SamplingConfig, client_ids: Sequence[str], sizes: Sequence[int], seed: int,
          min_chars: int = 2, what: str = "a batch"):
    """The sampler of a [sampling] table over the clients with at least `min_chars` chars.

    Args:
        cfg: the settings.
        client_ids, sizes: every train client and its characters, in store order.
        seed: the run's seed.
        min_chars: what a client needs to take part (a full batch, or one target).
        what: how to name that need in errors.
    """
    if cfg.clients:
        return FixedSampler(list(cfg.clients))
    sizes = np.asarray(sizes)
    ok = np.flatnonzero(sizes >= min_chars)
    ids = [client_ids[i] for i in ok]
    if cfg.clients_per_round > len(ids):
        raise FedtextError(f"clients_per_round {cfg.clients_per_round} > the {len(ids)} "
                           f"train clients with {what}")
    return SAMPLERS[cfg.method](ids, sizes[ok].tolist(), cfg.clients_per_round, seed)
