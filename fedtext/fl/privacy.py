"""Differential privacy: DP-FedAvg's Gaussian mechanism as an aggregator (user-level DP: the
unit of privacy is one client), with fixed or adaptive clipping, as TFF's
`DifferentiallyPrivateFactory` (tensorflow_federated/python/aggregators/differential_privacy.py)
built on tensorflow_privacy's queries.

The pipeline of one round, in this order (pfl's SimulatedBackend writes it the same way):

    for each client i (its delta d_i, uniform weight):
        zeroing (optional): d_i := 0 if max|d_i| > 2 C_z + 1          (TFF _default_zeroing)
        n_i = ||d_i||_2 over all tensors together
        clip:   d_i := d_i * min(1, C / n_i)                          (GaussianSumQuery)
        count:  u_i = [n_i <= C]                                      (adaptive only)
    sum:    S = sum_i d_i
    noise:  S := S + N(0, (z_sum C)^2) per coordinate
    mean:   S / M, M = the *expected* clients per round, never the actual number (that would
            leak it; NormalizedQuery). An empty round is pure noise / M.

Fixed clipping (`gaussian_fixed(z, M, C)`): C and z_sum = z stay as given.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping"; TFF `gaussian_adaptive`, tensorflow_privacy QuantileAdaptiveClipSumQuery with
geometric updates): the clip follows a target quantile q of the update norms. The unclipped
count is privatized with its own noise, std sigma_b (default 0.05 M), and the budget is split
so the two Gaussians compose to z: z_sum = (z^-2 - (2 sigma_b)^-2)^-1/2
(adaptive_clip_noise_params; needs z < 2 sigma_b). Then

    b = clamp((sum_i u_i - n/2 + N(0, sigma_b^2)) / M + 1/2, 0, 1)     (n: actual clients)
    C_next = C * exp(-lr (b - q))

and C_next clips the *next* round (this round used C). More unclipped than the target
shrinks the clip; at most by a factor exp(lr) per round.

Zeroing (TFF's dp_aggregator): updates whose largest |entry| exceeds 2 C_z + 1 are zeroed
before clipping; C_z starts at 10 and follows the 0.98 quantile of max|d_i| with learning rate
ln 10, a non-private estimate (TFF leaves it out of the accounting too).

Noise comes from a torch Generator whose state lives in the aggregator state, seeded from the
run seed, so resuming a run reproduces the same noise bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from fedtext.errors import FedtextError
from fedtext.fl import params as P
from fedtext.fl.aggregators import Aggregator
from fedtext.fl.params import Params

_NOISE_TAG = 3  # SeedSequence word: DP noise never shares a stream with sampling or clients


@dataclass(frozen=True)
class DPConfig:
    """[dp]: user-level differential privacy (DP-FedAvg). Off unless `mode` is set."""

    mode: str | None = field(default=None, metadata={
        "flag": "dp", "choices": ("fixed", "adaptive"),
        "help": "DP-FedAvg: fixed clipping (TFF gaussian_fixed) or adaptive clipping (Andrew "
        "et al. 2021, TFF gaussian_adaptive); default off"})
    clip: float | None = field(default=None, metadata={
        "flag": "dp-clip", "help": "L2 clip of each client's delta (adaptive: the initial "
        "clip; default 0.1 there, as TFF; fixed: required)"})
    noise_multiplier: float | None = field(default=None, metadata={
        "flag": "dp-noise-multiplier", "help": "z: noise std = z x clip on the sum (give it "
        "or --dp-target-epsilon)"})
    target_epsilon: float | None = field(default=None, metadata={
        "flag": "dp-target-epsilon", "help": "calibrate z so that the planned rounds spend "
        "this epsilon (at --dp-delta)"})
    delta: float = field(default=1e-5, metadata={
        "flag": "dp-delta", "help": "the delta of (epsilon, delta)-DP; must be < 1/clients"})
    target_quantile: float = field(default=0.5, metadata={
        "flag": "dp-target-quantile", "help": "adaptive: the fraction of updates to leave "
        "unclipped"})
    clip_lr: float = field(default=0.2, metadata={
        "flag": "dp-clip-lr", "help": "adaptive: learning rate of the geometric clip update"})
    clipped_count_stddev: float | None = field(default=None, metadata={
        "flag": "dp-count-stddev", "help": "adaptive: noise std of the unclipped count "
        "(default 0.05 x clients per round, TFF's)"})
    zeroing: bool = field(default=False, metadata={
        "flag": "dp-zeroing", "help": "zero updates with an absurd largest entry first (TFF "
        "dp_aggregator's adaptive zeroing)"})
    accountant: str = field(default="rdp", metadata={
        "flag": "dp-accountant", "choices": ("rdp", "pld"), "help": "dp-accounting's Renyi DP "
        "or privacy-loss-distribution accountant (PLD is tighter, Poisson sampling only)"})

    def __post_init__(self):
        if self.mode not in (None, "fixed", "adaptive"):
            raise FedtextError(f"mode must be fixed or adaptive, not {self.mode!r}")
        if self.mode is None:
            return
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise FedtextError("noise_multiplier or target_epsilon, not both")
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise FedtextError("noise_multiplier needs a value (or give --dp-target-epsilon)")
        if self.noise_multiplier is not None and not self.noise_multiplier >= 0:
            raise FedtextError(f"noise_multiplier must be >= 0, not {self.noise_multiplier}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise FedtextError(f"target_epsilon must be > 0, not {self.target_epsilon}")
        if self.mode == "fixed" and self.clip is None:
            raise FedtextError("clip needs a value with fixed clipping (--dp-clip C)")
        if self.clip is not None and not self.clip > 0:
            raise FedtextError(f"clip must be > 0, not {self.clip}")
        if not 0 < self.delta < 1:
            raise FedtextError(f"delta must be in (0, 1), not {self.delta}")
        if not 0 <= self.target_quantile <= 1:
            raise FedtextError(f"target_quantile must be in [0, 1], not {self.target_quantile}")
        if not self.clip_lr >= 0:
            raise FedtextError(f"clip_lr must be >= 0, not {self.clip_lr}")
        if self.clipped_count_stddev is not None and not self.clipped_count_stddev >= 0:
            raise FedtextError(f"clipped_count_stddev must be >= 0, not "
                               f"{self.clipped_count_stddev}")


def adaptive_noise(z: float, expected_clients: float,
                   count_stddev: float | None = None) -> tuple[float, float]:
    """(z for the sum, std of the count noise) that compose to z, as TFF's
    adaptive_clip_noise_params. z = 0 gives (0, count_stddev or 0)."""
    if z == 0:
        return 0.0, count_stddev or 0.0
    ccs = 0.05 * expected_clients if count_stddev is None else count_stddev
    if z >= 2 * ccs:
        raise FedtextError(f"adaptive clipping with noise multiplier {z:g} needs a count noise "
                           f"std > z / 2 = {z / 2:g} (have {ccs:g}: with the default 0.05 x "
                           f"clients per round, more than {10 * z:g} expected clients); raise "
                           "--clients-per-round or --dp-count-stddev")
    return (z ** -2 - (2 * ccs) ** -2) ** -0.5, ccs


class DPState(NamedTuple):
    rounds: int  # aggregations done
    clip: float  # C for the next round
    zero_norm: float  # C_z of zeroing for the next round (unused without zeroing)
    last_clip: float  # the C the last round used
    last_clients: int  # clients in the last round
    last_clipped: int  # of them, clipped (norm > C)
    last_zeroed: int  # of them, zeroed
    rng: torch.Tensor  # the noise Generator's state: resume reproduces the same noise


def dp_gaussian(noise_multiplier: float, expected_clients: float, clip: float, *,
                adaptive: bool = False, target_quantile: float = 0.5, clip_lr: float = 0.2,
                clipped_count_stddev: float | None = None, zeroing: bool = False,
                seed: int = 0) -> Aggregator:
    """The DP Gaussian aggregator (module docstring), with uniform client weights.

    Args:
        noise_multiplier: z, the total noise multiplier (split between the sum and the
            count with adaptive clipping).
        expected_clients: M, the expected clients per round: the sum is divided by it.
        clip: C (the initial C with adaptive clipping).
        adaptive, target_quantile, clip_lr, clipped_count_stddev: adaptive clipping.
        zeroing: zero absurdly large updates first.
        seed: the noise generator's seed (the run seed).
    """
    if not expected_clients > 0:
        raise FedtextError(f"expected clients per round must be > 0, got {expected_clients}")
    z_sum, ccs = (adaptive_noise(noise_multiplier, expected_clients, clipped_count_stddev)
                  if adaptive else (noise_multiplier, 0.0))
    M = float(expected_clients)

    def init(params):
        del params
        g = torch.Generator().manual_seed(int(np.random.SeedSequence(
            [seed, _NOISE_TAG]).generate_state(1)[0]))
        return DPState(0, float(clip), 10.0, float(clip), 0, 0, 0, g.get_state())

    def aggregate(deltas_and_weights: Iterable[tuple[Params, float]], state: DPState):
        C = state.clip
        total, keys, n, unclipped, zeroed, below_z = None, None, 0, 0, 0, 0
        for delta, w in deltas_and_weights:
            if w != 1.0:
                raise FedtextError("differential privacy weighs every client the same: use "
                                   "--weighting uniform")
            n += 1
            if zeroing:
                top = max(float(v.abs().max()) for v in delta.values())
                below_z += top <= state.zero_norm
                if top > 2 * state.zero_norm + 1:
                    delta, zeroed = P.zeros_like(delta), zeroed + 1
            norm = P.global_norm(delta)
            unclipped += norm <= C
            # TF computes the scale as C * min(1/norm, 1/C): 1 (to an ulp) when norm <= C.
            scale = C * min(1.0 / norm, 1.0 / C) if norm > 0 else 1.0
            if total is None:
                keys = list(delta)
                total = [delta[k] * scale for k in keys]  # fresh: the inputs stay untouched
            else:
                torch._foreach_add_(total, [delta[k] for k in keys], alpha=scale)
        if total is None:
            raise FedtextError("no client delta to aggregate (an empty round goes to "
                               "aggregate_empty)")
        return _finish(dict(zip(keys, total)), state, n, unclipped, zeroed, below_z)

    def aggregate_empty(params: Params, state: DPState):
        """A round with no clients (Poisson sampling): zeros + noise, / M, and the round is
        charged to the privacy budget all the same."""
        return _finish(P.zeros_like(params), state, 0, 0, 0, 0)

    def _finish(total: Params, state: DPState, n, unclipped, zeroed, below_z):
        C = state.clip
        g = torch.Generator()
        g.set_state(state.rng)
        std = z_sum * C
        for t in total.values():  # noise on the sum, coordinate by coordinate, then / M
            if std > 0:
                t.add_(torch.normal(0.0, std, t.shape, generator=g, dtype=t.dtype))
            t.div_(M)
        new_clip = C
        if adaptive:
            noise_b = float(torch.normal(0.0, ccs, (1,), generator=g)) if ccs > 0 else 0.0
            b = min(1.0, max(0.0, (unclipped - 0.5 * n + noise_b) / M + 0.5))
            new_clip = max(C * math.exp(-clip_lr * (b - target_quantile)), 0.0)
        zero_norm = state.zero_norm
        if zeroing and n:  # non-private, over the actual clients (0/0 guarded)
            zero_norm *= math.exp(-math.log(10.0) * (below_z / n - 0.98))
        return total, DPState(state.rounds + 1, new_clip, zero_norm, C, n, n - unclipped,
                              zeroed, g.get_state())

    return Aggregator(init, aggregate, aggregate_empty)
