"""Privacy accounting for DP-FedAvg with Google's `dp-accounting` library (no hand-written
accountant): the epsilon a run has spent after r rounds, and the noise multiplier that makes
a planned run spend a target epsilon.

One round is one Gaussian mechanism on the clipped sum (noise multiplier z, sensitivity C
per client) applied to a sampled cohort:

    poisson   each of the N clients joins with probability q = K / N:
              PoissonSampledDpEvent(q, GaussianDpEvent(z)), add-or-remove-one neighbours;
              the RDP (default) or PLD accountant. (TFF's DP tutorial does the same.)
    uniform   exactly K of the N clients, without replacement:
              SampledWithoutReplacementDpEvent(N, K, GaussianDpEvent(z / 2)), replace-one
              neighbours, RDP only. Replacing one client moves the clipped sum by up to 2C,
              so the Gaussian's multiplier relative to that sensitivity is z / 2;
              dp-accounting's RDP bound takes its multiplier relative to the sensitivity
              (google/differential-privacy issue #378), hence the halving. This is the
              strict bound, and much larger than Poisson's: prefer Poisson with DP.

Adaptive clipping adds a second Gaussian (the unclipped count) whose multiplier is chosen so
that both together compose to exactly z (fedtext.fl.privacy.adaptive_noise), so the event
of a round is GaussianDpEvent(z) there too, as dp-accounting's own RDP composition of the
two confirms. R rounds are SelfComposedDpEvent(event, R).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math

import dp_accounting as dpa
from dp_accounting import pld, rdp

from fedtext.errors import FedtextError

SAMPLINGS = ("poisson", "uniform")
ACCOUNTANTS = ("rdp", "pld")


@contextlib.contextmanager
def _quiet():
    """dp-accounting logs (through absl) every Renyi order whose bound did not converge, and
    drops that order from the minimum: expected at some orders, and noise in a training log."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def round_event(noise_multiplier: float, sampling: str, population: int,
                cohort: int) -> dpa.DpEvent:
    """The DpEvent of one round (module docstring)."""
    if not 1 <= cohort <= population:
        raise FedtextError(f"clients per round must be in [1, {population}], got {cohort}")
    if sampling == "poisson":
        return dpa.PoissonSampledDpEvent(cohort / population,
                                         dpa.GaussianDpEvent(noise_multiplier))
    if sampling == "uniform":
        return dpa.SampledWithoutReplacementDpEvent(population, cohort,
                                                    dpa.GaussianDpEvent(noise_multiplier / 2))
    raise FedtextError(f"DP accounting knows poisson and uniform sampling, not {sampling!r}")


def make_accountant(sampling: str, accountant: str = "rdp"):
    relation = dpa.NeighboringRelation
    if accountant == "rdp":
        return rdp.RdpAccountant(neighboring_relation=relation.REPLACE_ONE
                                 if sampling == "uniform" else relation.ADD_OR_REMOVE_ONE)
    if accountant == "pld":
        if sampling != "poisson":
            raise FedtextError("the PLD accountant supports Poisson sampling only; use "
                               "--dp-accountant rdp with uniform sampling")
        return pld.PLDAccountant()
    raise FedtextError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, not {accountant!r}")


@functools.lru_cache(maxsize=4096)
def epsilon(noise_multiplier: float, rounds: int, delta: float, sampling: str,
            population: int, cohort: int, accountant: str = "rdp") -> float:
    """Epsilon at `delta` after `rounds` rounds (inf with no noise, 0 before any round)."""
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = make_accountant(sampling, accountant)
    with _quiet():  # the RDP accountant computes its orders in compose, the warnings with them
        acc.compose(dpa.SelfComposedDpEvent(round_event(noise_multiplier, sampling,
                                                        population, cohort), rounds))
        return float(acc.get_epsilon(delta))


def calibrate(target_epsilon: float, rounds: int, delta: float, sampling: str,
              population: int, cohort: int, accountant: str = "rdp") -> float:
    """The smallest noise multiplier z with epsilon(z, rounds, ...) <= target_epsilon."""
    def event(z):
        return dpa.SelfComposedDpEvent(round_event(z, sampling, population, cohort), rounds)

    try:  # a lower end above 0: z = 0 is infinite epsilon (and breaks some events' math)
        with _quiet():
            z = dpa.calibrate_dp_mechanism(
                lambda: make_accountant(sampling, accountant), event, target_epsilon, delta,
                dpa.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-4)
    except dpa.NoBracketIntervalFoundError:
        raise FedtextError(f"no noise multiplier reaches epsilon {target_epsilon:g} in "
                           f"{rounds} rounds at delta {delta:g}") from None
    return float(z)


def check_delta(delta: float, population: int, flag: str = "--dp-delta") -> None:
    """delta must be below 1 / population: otherwise releasing one client's data outright
    would already be (0, delta)-DP, and the guarantee means nothing."""
    if not delta < 1.0 / population:
        raise FedtextError(f"{flag} {delta:g} must be below 1 / clients = "
                           f"{1.0 / population:.3g} ({population} clients)")
