"""Learning-rate schedules over rounds, for the server and the clients.

    lr_at = schedule(ScheduleConfig(kind="cosine", warmup=5), base_lr=0.01, rounds=100)
    lr_at(0), lr_at(99)        # round index 0 = the first round

A schedule is a pure function of the round index, so resuming needs no scheduler state. The
kinds (SCHEDULES):

    constant   base_lr
    step       base_lr * step_factor ** (r // step_every)
    cosine     min_lr + (base_lr - min_lr) * (1 + cos(pi * t)) / 2, t = (r - warmup) /
               (rounds - warmup) going 0 -> 1 over the run (nanoGPT's get_lr, per round)

and any of them can start with `warmup` rounds of linear warm-up, base_lr * (r + 1) /
(warmup + 1). TFF takes client and server learning rates as functions of the round the same
way (`client_learning_rate_fn(round_num)`). Extending a resumed run changes `rounds`, which
stretches a cosine schedule from there on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from fedtext.errors import FedtextError
from fedtext.registry import Registry

SCHEDULES = Registry("learning-rate schedule")
SCHEDULES.register("constant", lambda cfg, lr, r, rounds: lr)
SCHEDULES.register("step", lambda cfg, lr, r, rounds: lr * cfg.step_factor ** (
    r // cfg.step_every))


@SCHEDULES.register("cosine")
def _cosine(cfg, lr, r, rounds):
    t = min(max(r - cfg.warmup, 0) / max(rounds - cfg.warmup, 1), 1.0)
    return cfg.min_lr + (lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class ScheduleConfig:
    """A learning-rate schedule over rounds (the `schedule` table of [client] and [server])."""

    kind: str = field(default="constant", metadata={
        "flag": "schedule", "choices": SCHEDULES.names,
        "help": "learning-rate schedule over rounds: constant, step, cosine"})
    warmup: int = field(default=0, metadata={
        "help": "rounds of linear warm-up before the schedule"})
    step_every: int = field(default=100, metadata={
        "help": "step schedule: multiply the rate by step-factor every N rounds"})
    step_factor: float = field(default=0.1, metadata={"help": "step schedule: the factor"})
    min_lr: float = field(default=0.0, metadata={
        "flag": "min", "help": "cosine schedule: the rate at the last round"})

    def __post_init__(self):
        SCHEDULES.check(self.kind, "kind")
        if self.warmup < 0:
            raise FedtextError(f"warmup must be >= 0, not {self.warmup}")
        if self.step_every < 1:
            raise FedtextError(f"step_every must be >= 1, not {self.step_every}")
        if not 0 < self.step_factor <= 1:
            raise FedtextError(f"step_factor must be in (0, 1], not {self.step_factor}")
        if self.min_lr < 0:
            raise FedtextError(f"min_lr must be >= 0, not {self.min_lr}")


def schedule(cfg: ScheduleConfig, base_lr: float, rounds: int) -> Callable[[int], float]:
    """round index -> learning rate (see the module docstring)."""
    fn = SCHEDULES[cfg.kind]

    def lr_at(r: int) -> float:
        if r < cfg.warmup:
            return base_lr * (r + 1) / (cfg.warmup + 1)
        return float(fn(cfg, base_lr, r, rounds))

    return lr_at
