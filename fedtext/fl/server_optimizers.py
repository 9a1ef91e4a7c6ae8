"""Server optimizers: what the server does with the averaged client delta (optax's shape).

Each factory returns a `ServerOptimizer(init, update)` pair of pure functions, with its state
as a `<Name>State` NamedTuple value:

    state = opt.init(params)
    params, state = opt.update(delta, state, params)

Sign convention: `delta = global - local` is treated as a gradient, so the server step is
`params - lr * direction(delta)`; `sgd(lr=1.0)` sets the new global model to the weighted mean
of the client models, which is exactly FedAvg (McMahan et al. 2017).

The adaptive ones are FedAdagrad / FedAdam / FedYogi of Reddi et al. 2021, "Adaptive Federated
Optimization" (Algorithm 2): their server learning rate eta is our `lr`, beta_1 / beta_2 are
`b1` / `b2`, and their adaptivity tau is `eps`. The update rules and defaults follow
TensorFlow Federated's `tff.learning.optimizers` (build_sgdm, build_adam, build_yogi,
build_adagrad), which differ from the paper's pseudocode in small ways noted per factory.

`lr` may be a float or a schedule `round -> lr`, called with the number of updates done before
this one (0 on the first round).

The [server] table (`ServerConfig`) names one of SERVER_OPTIMIZERS and its settings; what a
setting left out means is the optimizer's own default (TFF's), spelled out in `resolved()`.

Reddi et al.'s released code (google-research/federated `optimization/`, whose shared
`optimizer_utils.py` builds the server optimizer from Keras classes) differs from TFF's
`tff.learning.optimizers` in two settings, both exposed here: the initial accumulator
(`initial_accumulator`: their README and docs/hyperparameters.md set
`--server_{adagrad,yogi}_initial_accumulator_value=0.0`; TFF's defaults are 0.1 and 1e-6) and,
for Adagrad, where eps sits (`eps_placement`: Keras' Adagrad divides by sqrt(v) + eps, TFF's
build_adagrad by sqrt(v + eps)). Adam (Keras and TFF alike) and their Yogi
(`utils/optimizers/yogi.py`) are bias-corrected with eps outside the root, as here.
configs/reddi2021/*.toml spell these out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch

from fedtext.errors import FedtextError
from fedtext.fl import params as P
from fedtext.fl.params import Params
from fedtext.fl.schedules import ScheduleConfig, schedule
from fedtext.registry import Registry

Schedule = float | Callable[[int], float]


class ServerOptimizer(NamedTuple):
    """A pair of pure functions (optax's GradientTransformation, returning params directly).

    init(params) -> state
    update(delta, state, params) -> (new_params, new_state); inputs are never modified.

    Example:
        >>> import torch
        >>> from fedtext.fl import server_optimizers
        >>> opt = server_optimizers.sgd(lr=1.0, momentum=0.5)
        >>> params = {"w": torch.tensor([1.0])}
        >>> state = opt.init(params)
        >>> params, state = opt.update({"w": torch.tensor([0.5])}, state, params)
        >>> params["w"].item(), state.count
        (0.5, 1)
    """

    init: Callable[[Params], Any]
    update: Callable[[Params, Any, Params], tuple[Params, Any]]


def _lr_at(lr: Schedule, count: int) -> float:
    return float(lr(count)) if callable(lr) else float(lr)


def _check_beta(name: str, value: float, closed: bool = False) -> None:
    if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
        raise FedtextError(f"{name} must be in [0, 1{']' if closed else ')'}, got {value}")


class SGDState(NamedTuple):
    count: int  # updates done so far
    momentum: Params | None  # TFF's "accumulator" v; None without momentum


def sgd(lr: Schedule = 1.0, momentum: float = 0.0, nesterov: bool = False) -> ServerOptimizer:
    """Server SGD with optional heavy-ball momentum: FedAvg (lr 1, no momentum) and FedAvgM.

    TFF `build_sgdm(learning_rate, momentum, nesterov)`: `v = momentum * v + delta`, then
    `w -= lr * v` (nesterov: `w -= lr * (delta + momentum * v)`). Note that momentum is not
    dampened by (1 - momentum), as in TFF and torch.optim.SGD. Reddi et al. call `lr` eta
    (eta_g in their FedAvgM baseline). TFF's default lr is 0.01; ours is 1.0, plain FedAvg.

    Args:
        lr: server learning rate (or a schedule round -> lr).
        momentum: in [0, 1]; 0 keeps no state.
        nesterov: use Nesterov momentum.
    """
    _check_beta("momentum", momentum, closed=True)
    if nesterov and not momentum:
        raise FedtextError("nesterov needs momentum > 0")

    def init(params):
        return SGDState(0, P.zeros_like(params) if momentum else None)

    def update(delta, state, params):
        step_lr = _lr_at(lr, state.count)
        if not momentum:
            return {k: params[k] - step_lr * delta[k] for k in params}, SGDState(
                state.count + 1, None)
        v = {k: momentum * state.momentum[k] + delta[k] for k in params}
        d = {k: delta[k] + momentum * v[k] for k in params} if nesterov else v
        return {k: params[k] - step_lr * d[k] for k in params}, SGDState(state.count + 1, v)

    return ServerOptimizer(init, update)


class AdamState(NamedTuple):
    count: int  # updates done so far (TFF's "step" before this update)
    mu: Params  # first moment m (TFF "accumulator")
    nu: Params  # second moment v (TFF "preconditioner")


def adam(lr: Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7,
         bias_correction: bool = True) -> ServerOptimizer:
    """FedAdam. TFF `build_adam(learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-7)`:

        m = b1 * m + (1 - b1) * delta
        v = b2 * v + (1 - b2) * delta**2
        lr_t = lr * sqrt(1 - b2**t) / (1 - b1**t)        # t = 1, 2, ...
        w = w - lr_t * m / (sqrt(v) + eps)

    m and v start at zero. eps sits outside the square root and is *not* bias corrected (the
    Keras/TFF placement). Reddi et al. 2021: lr = eta, b1 = beta_1, b2 = beta_2, eps = tau; their
    Algorithm 2 has no bias correction (`bias_correction=False` gives it exactly) and they
    tune tau around 1e-3, not TFF's 1e-7.
    """
    _check_beta("b1", b1)
    _check_beta("b2", b2)

    def init(params):
        return AdamState(0, P.zeros_like(params), P.zeros_like(params))

    def update(delta, state, params):
        t = state.count + 1
        mu = {k: torch.lerp(state.mu[k], delta[k], 1 - b1) for k in params}
        nu = {k: torch.lerp(state.nu[k], delta[k] * delta[k], 1 - b2) for k in params}
        step_lr = _lr_at(lr, state.count)
        if bias_correction:
            step_lr *= math.sqrt(1 - b2**t) / (1 - b1**t)
        new = {k: params[k] - step_lr * mu[k] / (nu[k].sqrt() + eps) for k in params}
        return new, AdamState(t, mu, nu)

    return ServerOptimizer(init, update)


class YogiState(NamedTuple):
    count: int
    mu: Params  # first moment m
    nu: Params  # Yogi's additive second moment v


def yogi(lr: Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-3,
         initial_preconditioner_value: float = 1e-6,
         bias_correction: bool = True) -> ServerOptimizer:
    """FedYogi. TFF `build_yogi(learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-3,
    initial_preconditioner_value=1e-6)`:

        m = b1 * m + (1 - b1) * delta
        v = v + (1 - b2) * sign(delta**2 - v) * delta**2       # v starts at the initial value
        lr_t = lr * sqrt(1 - b2**t) / (1 - b1**t)
        w = w - lr_t * m / (sqrt(v) + eps)

    (TFF's docstring writes sign(g - s); its code, and Zaheer et al. 2018, use g**2 - s.)
    Reddi et al. 2021: lr = eta, b1 = beta_1, b2 = beta_2, eps = tau; their v_{-1} >= tau**2 is
    `initial_preconditioner_value`; their Algorithm 2 has no bias correction
    (`bias_correction=False`). Their released code (google-research/federated
    utils/optimizers/yogi.py, the Keras `Yogi`) is this rule, bias-corrected, run with
    `initial_accumulator_value=0.0` (v starts at 0; where delta is 0, v stays 0 and so does
    the step).
    """
    _check_beta("b1", b1)
    _check_beta("b2", b2)
    if initial_preconditioner_value < 0:  # 0: Reddi et al.'s released runs
        raise FedtextError("initial_preconditioner_value must be >= 0")

    def init(params):
        return YogiState(0, P.zeros_like(params),
                         P.full_like(params, initial_preconditioner_value))

    def update(delta, state, params):
        t = state.count + 1
        mu = {k: torch.lerp(state.mu[k], delta[k], 1 - b1) for k in params}
        nu = {}
        for k in params:
            g2 = delta[k] * delta[k]
            nu[k] = state.nu[k] + (1 - b2) * torch.sign(g2 - state.nu[k]) * g2
        step_lr = _lr_at(lr, state.count)
        if bias_correction:
            step_lr *= math.sqrt(1 - b2**t) / (1 - b1**t)
        new = {k: params[k] - step_lr * mu[k] / (nu[k].sqrt() + eps) for k in params}
        return new, YogiState(t, mu, nu)

    return ServerOptimizer(init, update)


class AdagradState(NamedTuple):
    count: int
    nu: Params  # running sum of squared deltas (TFF "preconditioner")


def adagrad(lr: Schedule, initial_preconditioner_value: float = 0.1,
            eps: float = 1e-7, eps_inside: bool = True) -> ServerOptimizer:
    """FedAdagrad. TFF `build_adagrad(learning_rate, initial_preconditioner_value=0.1,
    epsilon=1e-7)`:

        v = v + delta**2                                  # v starts at the initial value
        w = w - lr * delta / sqrt(v + eps)                # eps_inside=False: sqrt(v) + eps

    Reddi et al. 2021: lr = eta. Their Algorithm 2's FedAdagrad also keeps a beta_1 momentum m
    and divides by sqrt(v) + tau (tau outside the root). Their released code runs Keras'
    `Adagrad` (no momentum; `ResourceApplyAdagradV2`: w -= lr * delta / (sqrt(v) + eps)) with
    `initial_accumulator_value=0.0`: `adagrad(lr, 0.0, eps, eps_inside=False)`. With v_0 = 0
    and eps outside, a coordinate whose delta is still 0 takes no step (0 / eps).
    """
    if initial_preconditioner_value < 0 or eps < 0:
        raise FedtextError("initial_preconditioner_value and eps must be >= 0")
    if eps_inside and initial_preconditioner_value == 0 and eps == 0:
        raise FedtextError("adagrad with eps inside the root needs eps > 0 or an initial "
                           "preconditioner value > 0 (else 0 / 0)")

    def init(params):
        return AdagradState(0, P.full_like(params, initial_preconditioner_value))

    def update(delta, state, params):
        nu = {k: state.nu[k] + delta[k] * delta[k] for k in params}
        step_lr = _lr_at(lr, state.count)
        if eps_inside:
            new = {k: params[k] - step_lr * delta[k] / (nu[k] + eps).sqrt() for k in params}
        else:
            new = {k: params[k] - step_lr * delta[k] / (nu[k].sqrt() + eps) for k in params}
        return new, AdagradState(state.count + 1, nu)

    return ServerOptimizer(init, update)


# ----------------------------------------------------------------------------- [server]


class Entry(NamedTuple):
    build: Callable  # (resolved ServerConfig, lr or schedule) -> ServerOptimizer
    defaults: dict  # ServerConfig fields left unset -> these values


SERVER_OPTIMIZERS = Registry("server optimizer")
SERVER_OPTIMIZERS.register("sgd", Entry(lambda c, lr: sgd(lr, c.momentum), {"momentum": 0.0}))
SERVER_OPTIMIZERS.register("sgdm", Entry(lambda c, lr: sgd(lr, c.momentum), {"momentum": 0.9}))
SERVER_OPTIMIZERS.register("adam", Entry(lambda c, lr: adam(lr, c.b1, c.b2, c.eps),
                                         {"eps": 1e-7}))
SERVER_OPTIMIZERS.register("yogi", Entry(
    lambda c, lr: yogi(lr, c.b1, c.b2, c.eps, c.initial_accumulator),
    {"eps": 1e-3, "initial_accumulator": 1e-6}))
SERVER_OPTIMIZERS.register("adagrad", Entry(
    lambda c, lr: adagrad(lr, c.initial_accumulator, c.eps, c.eps_placement == "inside"),
    {"eps": 1e-7, "initial_accumulator": 0.1, "eps_placement": "inside"}))


@dataclass(frozen=True)
class ServerConfig:
    """[server]: what the server does with the aggregated delta."""

    optimizer: str = field(default="sgd", metadata={
        "flag": "server-optimizer", "choices": SERVER_OPTIMIZERS.names,
        "help": "server optimizer on the mean delta: sgd (lr 1 = FedAvg), sgdm (FedAvgM), "
        "adam, yogi, adagrad (Reddi et al. 2021)"})
    lr: float = field(default=1.0, metadata={
        "flag": "server-lr", "help": "server learning rate (eta); 1 with sgd = FedAvg"})
    momentum: float | None = field(default=None, metadata={
        "flag": "server-momentum", "help": "sgd/sgdm momentum (default: 0.9 for sgdm, else 0)"})
    b1: float = field(default=0.9, metadata={
        "flag": "server-b1", "help": "adam/yogi beta_1 (Reddi et al.)"})
    b2: float = field(default=0.999, metadata={
        "flag": "server-b2", "help": "adam/yogi beta_2 (TFF's default)"})
    eps: float | None = field(default=None, metadata={
        "flag": "server-eps", "help": "adam/yogi/adagrad epsilon (tau) (default: TFF's per "
        "optimizer: adam 1e-7, yogi 1e-3, adagrad 1e-7)"})
    initial_accumulator: float | None = field(default=None, metadata={
        "flag": "server-initial-accumulator", "help": "yogi/adagrad: the second moment's "
        "start value v_0 (default: TFF's, yogi 1e-6, adagrad 0.1; Reddi et al.'s released "
        "runs: 0)"})
    eps_placement: str | None = field(default=None, metadata={
        "flag": "server-eps-placement", "choices": ("inside", "outside"),
        "help": "adagrad: divide by sqrt(v + eps) (inside: TFF's build_adagrad, the default) "
        "or sqrt(v) + eps (outside: Keras' Adagrad, Reddi et al.'s released code)"})
    schedule: ScheduleConfig = field(default=ScheduleConfig(), metadata={
        "flag_prefix": "server-lr"})

    def __post_init__(self):
        entry = SERVER_OPTIMIZERS[SERVER_OPTIMIZERS.check(self.optimizer, "optimizer")]
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FedtextError(f"lr must be a finite number > 0, not {self.lr}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise FedtextError(f"{name} must be in [0, 1), not {getattr(self, name)}")
        if self.momentum is not None:
            if "momentum" not in entry.defaults:
                raise FedtextError(f"momentum needs optimizer sgd or sgdm, not "
                                   f"{self.optimizer!r}")
            if not 0 <= self.momentum <= 1:
                raise FedtextError(f"momentum must be in [0, 1], not {self.momentum}")
        if self.eps is not None:
            if "eps" not in entry.defaults:
                raise FedtextError(f"eps needs optimizer adam, yogi or adagrad, not "
                                   f"{self.optimizer!r}")
            if not self.eps >= 0:
                raise FedtextError(f"eps must be >= 0, not {self.eps}")
        if self.initial_accumulator is not None:
            if "initial_accumulator" not in entry.defaults:
                raise FedtextError(f"initial_accumulator needs optimizer yogi or adagrad, not "
                                   f"{self.optimizer!r}")
            if not (self.initial_accumulator >= 0 and math.isfinite(self.initial_accumulator)):
                raise FedtextError(f"initial_accumulator must be a finite number >= 0, not "
                                   f"{self.initial_accumulator}")
        if self.eps_placement is not None:
            if "eps_placement" not in entry.defaults:
                raise FedtextError(f"eps_placement needs optimizer adagrad (adam and yogi "
                                   f"always add eps outside the root), not {self.optimizer!r}")
            if self.eps_placement not in ("inside", "outside"):
                raise FedtextError(f"eps_placement must be inside or outside, not "
                                   f"{self.eps_placement!r}")

    def resolved(self) -> ServerConfig:
        """The same settings with the optimizer's defaults filled in."""
        defaults = SERVER_OPTIMIZERS[self.optimizer].defaults
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})


def build(cfg: ServerConfig, rounds: int) -> ServerOptimizer:
    """The ServerOptimizer of a [server] table, for a run of `rounds` rounds."""
    c = cfg.resolved()
    lr = c.lr
    if c.schedule != ScheduleConfig():
        lr = schedule(c.schedule, c.lr, rounds)
    return SERVER_OPTIMIZERS[c.optimizer].build(c, lr)
