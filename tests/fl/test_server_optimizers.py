"""Server optimizers: single steps computed by hand from TFF's update rules, plus one contract
test run over every optimizer."""

import copy
import math

import pytest
import torch

from fedtext.errors import FedtextError
from fedtext.fl import params as P
from fedtext.fl import server_optimizers as so


def _w(v):
    return {"w": torch.tensor([v], dtype=torch.float64)}


def _step(opt, w, deltas):
    params, state = _w(w), None
    state = opt.init(params)
    for d in deltas:
        params, state = opt.update(_w(d), state, params)
    return params["w"].item(), state


def test_sgd_is_fedavg():
    # w - lr * delta; with lr 1 the new model is global - mean(global - local) = mean(local).
    assert _step(so.sgd(), 1.0, [0.25])[0] == 0.75
    assert _step(so.sgd(lr=0.5), 1.0, [0.5])[0] == 0.75
    w, state = _step(so.sgd(lr=0.5), 1.0, [0.5, 0.5])
    assert w == 0.5 and state.count == 2 and state.momentum is None


def test_sgd_momentum_tff_accumulator():
    # TFF build_sgdm: v = m v + g, w -= lr v (no dampening).
    # v1 = 1, w1 = 2 - 1 = 1;  v2 = 0.5 * 1 + 1 = 1.5, w2 = 1 - 1.5 = -0.5.
    w, state = _step(so.sgd(lr=1.0, momentum=0.5), 2.0, [1.0, 1.0])
    assert w == -0.5 and state.momentum["w"].item() == 1.5
    # Nesterov: w -= lr (g + m v): v1 = 1, w1 = 2 - (1 + 0.5) = 0.5.
    assert _step(so.sgd(lr=1.0, momentum=0.5, nesterov=True), 2.0, [1.0])[0] == 0.5


def test_adam_first_step_tff():
    # g = 2: m = 0.1 * 2 = 0.2, v = 0.001 * 4 = 0.004,
    # lr_t = 0.1 * sqrt(1 - 0.999) / (1 - 0.9), w = 1 - lr_t * m / (sqrt(v) + 1e-7).
    lr_t = 0.1 * math.sqrt(0.001) / 0.1
    expected = 1.0 - lr_t * 0.2 / (math.sqrt(0.004) + 1e-7)
    w, state = _step(so.adam(lr=0.1), 1.0, [2.0])
    assert w == pytest.approx(expected, abs=1e-15)
    assert w == pytest.approx(0.9, abs=1e-5)  # Adam's first step is ~lr * sign(g)
    assert state.count == 1
    assert state.mu["w"].item() == pytest.approx(0.2, abs=1e-15)
    assert state.nu["w"].item() == pytest.approx(0.004, abs=1e-15)


def test_adam_second_step_and_no_bias_correction():
    # Step 2 with g = -1: m = 0.9 * 0.2 - 0.1 = 0.08, v = 0.999 * 0.004 + 0.001 = 0.004996.
    w1 = 1.0 - 0.1 * math.sqrt(0.001) / 0.1 * 0.2 / (math.sqrt(0.004) + 1e-7)
    lr_t = 0.1 * math.sqrt(1 - 0.999**2) / (1 - 0.9**2)
    expected = w1 - lr_t * 0.08 / (math.sqrt(0.004996) + 1e-7)
    assert _step(so.adam(lr=0.1), 1.0, [2.0, -1.0])[0] == pytest.approx(expected, abs=1e-14)
    # Reddi et al. Algorithm 2 (no bias correction): w = 1 - 0.1 * 0.2 / (sqrt(0.004) + tau).
    expected = 1.0 - 0.1 * 0.2 / (math.sqrt(0.004) + 1e-3)
    w = _step(so.adam(lr=0.1, eps=1e-3, bias_correction=False), 1.0, [2.0])[0]
    assert w == pytest.approx(expected, abs=1e-15)


def test_yogi_tff():
    # v0 = 1e-6; g = 2: v = 1e-6 + 0.001 * sign(4 - 1e-6) * 4 = 0.004001, m = 0.2.
    lr_t = 0.1 * math.sqrt(0.001) / 0.1
    w1 = 1.0 - lr_t * 0.2 / (math.sqrt(0.004001) + 1e-3)
    w, state = _step(so.yogi(lr=0.1), 1.0, [2.0])
    assert w == pytest.approx(w1, abs=1e-15)
    assert state.nu["w"].item() == pytest.approx(0.004001, abs=1e-15)
    # g = 0.01: g^2 = 1e-4 < v, so v *decreases* additively: v = 0.004001 - 0.001 * 1e-4.
    w, state = _step(so.yogi(lr=0.1), 1.0, [2.0, 0.01])
    v2, m2 = 0.004001 - 1e-7, 0.9 * 0.2 + 0.1 * 0.01
    lr_t = 0.1 * math.sqrt(1 - 0.999**2) / (1 - 0.9**2)
    assert state.nu["w"].item() == pytest.approx(v2, abs=1e-15)
    assert w == pytest.approx(w1 - lr_t * m2 / (math.sqrt(v2) + 1e-3), abs=1e-14)


def test_adagrad_tff():
    # v0 = 0.1; g = 0.5: v = 0.35, w = 1 - 0.2 * 0.5 / sqrt(0.35 + 1e-7).
    w, state = _step(so.adagrad(lr=0.2), 1.0, [0.5])
    assert w == pytest.approx(1.0 - 0.1 / math.sqrt(0.35 + 1e-7), abs=1e-15)
    assert state.nu["w"].item() == pytest.approx(0.35, abs=1e-15)
    # g = 1 next: v = 1.35.
    w2, _ = _step(so.adagrad(lr=0.2), 1.0, [0.5, 1.0])
    assert w2 == pytest.approx(w - 0.2 / math.sqrt(1.35 + 1e-7), abs=1e-15)


def test_schedule_gets_the_round():
    seen = []

    def lr(r):
        seen.append(r)
        return [1.0, 0.5, 0.25][r]

    w, _ = _step(so.sgd(lr=lr), 0.0, [1.0, 1.0, 1.0])
    assert w == -1.75 and seen == [0, 1, 2]


def _same(a, b) -> bool:
    """Equal NamedTuple states, comparing tensors inside dict fields exactly."""
    for x, y in zip(a, b, strict=True):
        if isinstance(x, dict):
            if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
                return False
        elif x != y:
            return False
    return True


OPTIMIZERS = {
    "sgd": lambda: so.sgd(),
    "sgd_lr_schedule": lambda: so.sgd(lr=lambda r: 0.5 / (1 + r)),
    "sgdm": lambda: so.sgd(lr=0.5, momentum=0.9),
    "nesterov": lambda: so.sgd(lr=0.5, momentum=0.9, nesterov=True),
    "adam": lambda: so.adam(lr=0.01),
    "adam_reddi": lambda: so.adam(lr=0.01, eps=1e-3, bias_correction=False),
    "yogi": lambda: so.yogi(lr=0.01),
    "adagrad": lambda: so.adagrad(lr=0.01),
    # Reddi et al.'s released settings (configs/reddi2021/): v_0 = 0, Keras' eps placement.
    "yogi_reddi": lambda: so.yogi(lr=0.01, eps=1e-3, initial_preconditioner_value=0.0),
    "adagrad_reddi": lambda: so.adagrad(lr=0.3, initial_preconditioner_value=0.0, eps=0.1,
                                        eps_inside=False),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_contract(name):
    """init -> update x3: finite, same keys/shapes/dtypes, params move, inputs untouched."""
    opt = OPTIMIZERS[name]()
    g = torch.Generator().manual_seed(0)
    params = {"a.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(4, generator=g)}
    state = opt.init(params)
    for _ in range(3):
        delta = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
        before = (P.clone(params), P.clone(delta), copy.deepcopy(state))
        new, new_state = opt.update(delta, state, params)
        assert list(new) == list(params)
        for k in params:
            assert new[k].shape == params[k].shape and new[k].dtype == params[k].dtype
            assert torch.isfinite(new[k]).all()
            assert not torch.equal(new[k], params[k])
            assert torch.equal(params[k], before[0][k]) and torch.equal(delta[k], before[1][k])
        assert _same(state, before[2])  # the old state value is unchanged
        assert new_state.count == state.count + 1
        params, state = new, new_state


def test_registry_and_validation():
    assert set(so.SERVER_OPTIMIZERS) == {"sgd", "sgdm", "adam", "yogi", "adagrad"}
    for bad in (lambda: so.adam(lr=0.1, b1=1.0), lambda: so.yogi(lr=0.1, b2=-0.1),
                lambda: so.sgd(momentum=1.5), lambda: so.sgd(nesterov=True),
                lambda: so.yogi(lr=0.1, initial_preconditioner_value=-1.0),
                lambda: so.adagrad(lr=0.1, initial_preconditioner_value=0.0, eps=0.0)):
        with pytest.raises(FedtextError):
            bad()


def test_server_config_fills_each_optimizers_defaults():
    assert so.ServerConfig(optimizer="sgdm").resolved().momentum == 0.9
    assert so.ServerConfig().resolved().momentum == 0.0
    assert so.ServerConfig(optimizer="yogi").resolved().eps == 1e-3
    assert so.ServerConfig(optimizer="adam", eps=0.01).resolved().eps == 0.01
    assert so.ServerConfig(optimizer="adam").resolved().momentum is None
    with pytest.raises(FedtextError, match="momentum needs optimizer sgd"):
        so.ServerConfig(optimizer="adam", momentum=0.9)
    with pytest.raises(FedtextError, match="eps needs optimizer adam"):
        so.ServerConfig(eps=0.1)
    with pytest.raises(FedtextError, match="optimizer must be one of"):
        so.ServerConfig(optimizer="adamw")


def test_built_optimizers_follow_their_config():
    params = {"w": torch.tensor([1.0])}
    delta = {"w": torch.tensor([0.5])}
    opt = so.build(so.ServerConfig(optimizer="sgdm", lr=0.5), rounds=10)
    new, state = opt.update(delta, opt.init(params), params)
    assert new["w"].item() == 0.75 and state.momentum["w"].item() == 0.5
    # A cosine schedule over 3 rounds: full rate, half, then min_lr.
    cfg = so.ServerConfig(lr=1.0, schedule=so.ScheduleConfig(kind="cosine"))
    opt = so.build(cfg, rounds=2)
    state, p = opt.init(params), params
    steps = []
    for _ in range(3):
        q, state = opt.update(delta, state, p)
        steps.append(round((p["w"] - q["w"]).item() / 0.5, 6))
        p = q
    assert steps == [1.0, 0.5, 0.0]


# ---- Reddi et al.'s released code: Keras optimizers (google-research/federated optimization/)


def test_keras_adagrad_is_torch_adagrad():
    # Keras' Adagrad (ResourceApplyAdagradV2: w -= lr * g / (sqrt(v) + eps)) is also exactly
    # torch.optim.Adagrad's rule; Reddi et al. ran it with initial_accumulator_value = 0.
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, dtype=torch.float64, generator=g)
    deltas = [torch.randn(5, dtype=torch.float64, generator=g) for _ in range(4)]
    deltas[1][2] = 0.0  # a zero delta on a fresh coordinate: no step, no 0/0
    opt = so.adagrad(lr=10 ** -0.5, initial_preconditioner_value=0.0, eps=0.1, eps_inside=False)
    params, state = {"w": w0}, None
    state = opt.init(params)
    ref = torch.nn.Parameter(w0.clone())
    torch_opt = torch.optim.Adagrad([ref], lr=10 ** -0.5, initial_accumulator_value=0.0,
                                    eps=0.1)
    for d in deltas:
        params, state = opt.update({"w": d}, state, params)
        ref.grad = d.clone()
        torch_opt.step()
        assert torch.allclose(params["w"], ref.detach(), rtol=0, atol=1e-15)
    # By hand, first step: v = g^2, w = w0 - lr * g / (|g| + 0.1).
    w1, _ = _step(so.adagrad(lr=0.5, initial_preconditioner_value=0.0, eps=0.1,
                             eps_inside=False), 1.0, [0.3])
    assert w1 == pytest.approx(1.0 - 0.5 * 0.3 / (0.3 + 0.1), abs=1e-15)


def test_keras_yogi_from_zero():
    # google-research/federated utils/optimizers/yogi.py with initial_accumulator_value = 0:
    # v1 = 0 + (1 - b2) * sign(g^2 - 0) * g^2, bias-corrected lr, eps outside the root.
    g1, g2 = 0.5, -0.1
    v1 = 0.001 * g1**2
    m1 = 0.1 * g1
    w1 = 1.0 - 0.01 * math.sqrt(0.001) / 0.1 * m1 / (math.sqrt(v1) + 1e-3)
    v2 = v1 + 0.001 * math.copysign(1.0, g2**2 - v1) * g2**2
    m2 = 0.9 * m1 + 0.1 * g2
    lr2 = 0.01 * math.sqrt(1 - 0.999**2) / (1 - 0.9**2)
    w2 = w1 - lr2 * m2 / (math.sqrt(v2) + 1e-3)
    w, state = _step(so.yogi(lr=0.01, eps=1e-3, initial_preconditioner_value=0.0), 1.0,
                     [g1, g2])
    assert state.nu["w"].item() == pytest.approx(v2, abs=1e-16)
    assert w == pytest.approx(w2, abs=1e-14)
    w0, state = _step(so.yogi(lr=0.01, initial_preconditioner_value=0.0), 1.0, [0.0])
    assert w0 == 1.0 and state.nu["w"].item() == 0.0  # a zero delta: v stays 0, no step


def test_keras_sgd_momentum_is_fedavgm():
    # Keras SGD(momentum): v = 0.9 v - lr g; w += v, i.e. torch.optim.SGD(momentum=0.9).
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(4, dtype=torch.float64, generator=g)
    opt = so.sgd(lr=10 ** -0.5, momentum=0.9)
    params = {"w": w0}
    state = opt.init(params)
    ref = torch.nn.Parameter(w0.clone())
    torch_opt = torch.optim.SGD([ref], lr=10 ** -0.5, momentum=0.9)
    for _ in range(5):
        d = torch.randn(4, dtype=torch.float64, generator=g)
        params, state = opt.update({"w": d}, state, params)
        ref.grad = d.clone()
        torch_opt.step()
        assert torch.allclose(params["w"], ref.detach(), rtol=0, atol=1e-14)


def test_server_config_reddi_settings():
    c = so.ServerConfig(optimizer="adagrad", lr=10 ** -0.5, eps=0.1, initial_accumulator=0.0,
                        eps_placement="outside")
    w, _ = _step(so.build(c, rounds=10), 1.0, [0.3])
    assert w == pytest.approx(1.0 - 10 ** -0.5 * 0.3 / 0.4, abs=1e-15)
    r = so.ServerConfig(optimizer="adagrad").resolved()  # TFF's defaults when left out
    assert (r.initial_accumulator, r.eps_placement, r.eps) == (0.1, "inside", 1e-7)
    assert so.ServerConfig(optimizer="yogi").resolved().initial_accumulator == 1e-6
    assert so.ServerConfig(optimizer="adam").resolved().initial_accumulator is None
    for bad in (dict(optimizer="adam", initial_accumulator=0.0),
                dict(optimizer="yogi", eps_placement="outside"),
                dict(optimizer="adagrad", eps_placement="middle"),
                dict(optimizer="adagrad", initial_accumulator=-1.0)):
        with pytest.raises(FedtextError):
            so.ServerConfig(**bad)
