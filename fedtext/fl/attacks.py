"""Simulated attackers and faulty devices: seeded, reproducible, off by default.

    [attack] kind = "sign-flip" | "scale:K" | "gaussian:S" | "nan" | "label-flip"
             attackers = "0.2" (a fraction of each round's clients) or "3" (a count)

Which clients of round r attack is a pure function of (seed, r, the round's size), so every
backend, and a resumed run, sees the same attack. The attack is applied where a real
attacker would act, outside the honest client code:

    sign-flip   the client sends -delta                      (reversing the honest update)
    scale:K     the client sends K * delta                   (a boosting attack, K = 10 say)
    gaussian:S  the client sends N(0, S^2) noise instead     (Blanchard et al.'s "Gaussian")
    nan         the client sends NaN everywhere              (a broken device)
    label-flip  the client trains on flipped targets: character id c of the vocabulary's
                characters becomes the mirror one (first + last - c); specials stay
                (data poisoning; the update itself is computed honestly on bad data)

Dropouts (`[faults] dropout = P`) are the benign fault: each sampled client goes away with
probability P before it trains (a phone that lost its connection), again seeded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fedtext.data.batching import Batch
from fedtext.errors import FedtextError

_ATTACK_TAG, _DROPOUT_TAG, _NOISE_TAG = 4, 5, 6  # SeedSequence words of their own
KINDS = ("sign-flip", "scale", "gaussian", "nan", "label-flip")


@dataclass(frozen=True)
class AttackConfig:
    """[attack]: simulated malicious clients (off unless kind is set)."""

    kind: str | None = field(default=None, metadata={
        "flag": "attack", "metavar": "sign-flip|scale:K|gaussian:S|nan|label-flip",
        "help": "what the round's attackers do (fedtext/fl/attacks.py); default none"})
    attackers: str | None = field(default=None, metadata={
        "metavar": "N|FRACTION", "help": "how many of each round's clients attack: a count "
        "(3) or a fraction (0.2), chosen by the seed"})

    def __post_init__(self):
        if self.kind is None:
            if self.attackers is not None:
                raise FedtextError("attackers needs an attack (--attack KIND)")
            return
        parse_kind(self.kind)
        if self.attackers is None:
            raise FedtextError("kind needs attackers too (--attackers N or FRACTION)")
        parse_attackers(self.attackers)


def parse_kind(kind: str) -> tuple[str, float]:
    """"scale:10" -> ("scale", 10.0); "sign-flip" -> ("sign-flip", 0.0)."""
    name, _, arg = kind.partition(":")
    if name not in KINDS:
        raise FedtextError(f"kind must be one of sign-flip, scale:K, gaussian:S, nan, "
                           f"label-flip, not {kind!r}")
    needs = name in ("scale", "gaussian")
    if needs != bool(arg):
        raise FedtextError(f"kind {name} {'needs' if needs else 'takes no'} a value "
                           f"({'scale:10, gaussian:0.1' if needs else name})")
    try:
        value = float(arg) if arg else 0.0
    except ValueError:
        raise FedtextError(f"kind {kind!r}: {arg!r} is not a number") from None
    if name == "gaussian" and not value > 0:
        raise FedtextError(f"gaussian:S needs S > 0, not {value}")
    return name, value


def parse_attackers(text: str) -> float | int:
    """A count ("3" -> 3) or a fraction in [0, 1] ("0.2" -> 0.2)."""
    try:
        value = float(text)
    except ValueError:
        raise FedtextError(f"attackers must be a count or a fraction, not {text!r}") from None
    if "." not in text and value == int(value) and value >= 1:
        return int(value)
    if not 0 <= value <= 1:
        raise FedtextError(f"attackers as a fraction must be in [0, 1], not {text!r} (a count "
                           "is a whole number)")
    return value


def attacker_positions(cfg: AttackConfig, seed: int, round: int, n: int) -> list[int]:
    """Positions (in the round's client list) of the round's attackers, seeded."""
    if cfg.kind is None or n == 0:
        return []
    a = parse_attackers(cfg.attackers)
    count = min(n, a if isinstance(a, int) else int(round_half_up(a * n)))
    rng = np.random.default_rng(np.random.SeedSequence([seed, round, _ATTACK_TAG]))
    return sorted(int(i) for i in rng.choice(n, size=count, replace=False))


def round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def dropped_positions(p: float, seed: int, round: int, n: int) -> list[int]:
    """Positions of the clients that drop out of `round` before training, seeded."""
    if not p:
        return []
    rng = np.random.default_rng(np.random.SeedSequence([seed, round, _DROPOUT_TAG]))
    return [int(i) for i in np.flatnonzero(rng.random(n) < p)]


def attack_delta(kind: str, delta: dict, seed: int, round: int, position: int) -> dict:
    """What an attacker sends instead of its honest `delta` (module docstring)."""
    name, value = parse_kind(kind)
    if name == "sign-flip":
        return {k: -v for k, v in delta.items()}
    if name == "scale":
        return {k: v * value for k, v in delta.items()}
    if name == "nan":
        return {k: torch.full_like(v, float("nan")) for k, v in delta.items()}
    if name == "gaussian":
        g = torch.Generator().manual_seed(int(np.random.SeedSequence(
            [seed, round, position, _NOISE_TAG]).generate_state(1)[0]))
        return {k: torch.normal(0.0, value, v.shape, generator=g, dtype=v.dtype)
                for k, v in delta.items()}
    return delta  # label-flip acts on the data, not on the update


@dataclass(frozen=True)
class FlippedLabels:
    """A client's data with mirrored character targets (label-flip); picklable like the
    ClientData it wraps, so every backend trains the same poisoned batches."""

    data: object  # a ClientData, a callable (epoch, seed) -> batches, or a list of batches
    first: int  # the vocabulary's first character id
    count: int  # how many characters

    def _flip(self, b: Batch) -> Batch:
        y = b.y
        chars = (y >= self.first) & (y < self.first + self.count)
        flipped = torch.where(chars, 2 * self.first + self.count - 1 - y, y)
        return Batch(b.x, flipped, b.mask)

    def __call__(self, epoch: int, seed: int) -> list[Batch]:
        batches = self.data(epoch, seed) if callable(self.data) else self.data
        return [self._flip(b) for b in batches]
