"""DP-FedAvg: TFF's gaussian_fixed round reproduced, the plain mean as a limit, adaptive
clipping by hand, the noise's size, accounting equal to dp-accounting, exact resume."""

import logging
import math

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from helpers import REFERENCE, make_clients

from fedtext.config import FLAGS, ExperimentConfig, merge
from fedtext.data.batching import Batch
from fedtext.errors import FedtextError
from fedtext.fl import accounting
from fedtext.fl import params as P
from fedtext.fl.aggregators import mean
from fedtext.fl.algorithm import fed_avg
from fedtext.fl.client import ClientConfig
from fedtext.fl.privacy import DPConfig, adaptive_noise, dp_gaussian
from fedtext.fl.sampling import PoissonSampler
from fedtext.fl.server_optimizers import sgd
from fedtext.model.char_rnn import ModelConfig
from fedtext.model.keras import keras_to_state_dict, state_dict_to_keras
from fedtext.run.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(REFERENCE / "dp_fixed_round_small.npz"))


@pytest.mark.parametrize("cpr", [3, 4])
def test_one_round_matches_tff_gaussian_fixed(ref, cpr):
    init = {k[5:]: v for k, v in ref.items() if k.startswith("init.")}
    x, y = torch.from_numpy(ref["x"]), torch.from_numpy(ref["y"])  # (3, 3, 8, 100)
    ones = torch.ones(x.shape[2:], dtype=torch.bool)
    clients = [(str(c), [Batch(x[i, b], y[i, b], ones) for b in range(x.shape[1])])
               for i, c in enumerate(ref["client_ids"])]
    cfg = ClientConfig(model=ModelConfig(vocab_size=86, embed_dim=16, hidden_size=64), lr=0.5)
    agg = dp_gaussian(0.0, cpr, float(ref["clip"]))
    algorithm = fed_avg(cfg, sgd(lr=1.0), agg, weighting="uniform")
    state, metrics = algorithm.apply(algorithm.init(keras_to_state_dict(init)), clients)
    ours = state_dict_to_keras(state.params)
    worst = 0.0
    for k in init:
        want = ref[f"global_cpr{cpr}.{k}"]
        rel = float(np.abs(ours[k] - want).max() / np.abs(want).max())
        worst = max(worst, rel)
        np.testing.assert_allclose(ours[k], want, atol=1e-5, rtol=0)
    assert worst < 1e-5, worst
    # Two of the three clients were clipped (norms 0.4974, 0.4958 > C; 0.4937 < C).
    assert state.agg_state.last_clipped == 2 and state.agg_state.last_clients == 3
    assert ref["client_clipped"].tolist() == [True, True, False]
    print(f"clients_per_round={cpr}: max relative difference per tensor {worst:.2e}")


def test_noise_0_and_a_huge_clip_is_the_plain_unweighted_mean():
    g = torch.Generator().manual_seed(0)
    deltas = [{"a": torch.randn(300, generator=g), "b": torch.randn(4, 5, generator=g)}
              for _ in range(5)]
    dp = dp_gaussian(0.0, 5, 1e9)
    out, _ = dp.aggregate([(d, 1.0) for d in deltas], dp.init(deltas[0]))
    plain, _ = mean().aggregate([(d, 1.0) for d in deltas], mean().init(deltas[0]))
    for k in plain:
        torch.testing.assert_close(out[k], plain[k], rtol=1e-6, atol=1e-7)
    with pytest.raises(FedtextError, match="--weighting uniform"):
        dp.aggregate([(deltas[0], 3.0)], dp.init(deltas[0]))


def test_the_noise_std_is_z_c_over_expected_clients():
    z, C, M = 1.3, 0.7, 20
    dp = dp_gaussian(z, M, C)
    zero = {"w": torch.zeros(400_000)}
    out, _ = dp.aggregate([(zero, 1.0)], dp.init(zero))  # one (zero) client: pure noise
    std = float(out["w"].std())
    assert std == pytest.approx(z * C / M, rel=0.03)
    assert abs(float(out["w"].mean())) < 4 * z * C / M / math.sqrt(400_000)


def test_adaptive_clipping_by_hand():
    # Five updates of norms 1..5, clip 2.5, target quantile 0.5, lr 0.2, no noise, M = 5:
    # unclipped: norms 1 and 2 -> b = (2 - 2.5) / 5 + 0.5 = 0.4; C' = 2.5 exp(-0.2 (0.4 - 0.5)).
    deltas = [{"w": torch.tensor([float(n), 0.0])} for n in (1, 2, 3, 4, 5)]
    dp = dp_gaussian(0.0, 5, 2.5, adaptive=True, target_quantile=0.5, clip_lr=0.2)
    out, s = dp.aggregate([(d, 1.0) for d in deltas], dp.init(deltas[0]))
    assert s.last_clip == 2.5 and s.clip == pytest.approx(2.5 * math.exp(0.02), rel=1e-12)
    assert s.last_clipped == 3
    # This round clipped with the old C: (1 + 2 + 2.5 * 3) / 5 = 2.1.
    assert out["w"][0].item() == pytest.approx(2.1, rel=1e-6)
    # Repeated rounds walk the clip towards the median norm, 3.
    for _ in range(200):
        _, s = dp.aggregate([(d, 1.0) for d in deltas], s)
    assert 2.9 < s.clip <= 3.0 + 1e-9
    # The noise split composes to z (TFF's adaptive_clip_noise_params).
    z_sum, ccs = adaptive_noise(1.0, 100)
    assert ccs == 5.0 and (z_sum ** -2 + (2 * ccs) ** -2) ** -0.5 == pytest.approx(1.0)
    with pytest.raises(FedtextError, match="count noise"):
        adaptive_noise(1.0, 10)


def test_zeroing_drops_absurd_updates():
    deltas = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([1e6, 0.0])}]
    dp = dp_gaussian(0.0, 2, 10.0, zeroing=True)
    out, s = dp.aggregate([(d, 1.0) for d in deltas], dp.init(deltas[0]))
    assert s.last_zeroed == 1 and out["w"][0].item() == pytest.approx(0.5)


def test_an_empty_poisson_round_is_noise_over_the_expected_count():
    dp = dp_gaussian(1.0, 10, 2.0)
    like = {"w": torch.zeros(100_000)}
    out, s = dp.aggregate_empty(like, dp.init(like))
    assert s.last_clients == 0 and float(out["w"].std()) == pytest.approx(0.2, rel=0.03)
    sampler = PoissonSampler([f"c{i}" for i in range(50)], 0.02, seed=1)
    sizes = [len(sampler.sample(r)) for r in range(400)]
    assert 0 in sizes and np.mean(sizes) == pytest.approx(1.0, rel=0.15)
    assert sampler.sample(7) == sampler.sample(7)


@pytest.mark.parametrize("acc", ["rdp", "pld"])
def test_epsilon_equals_dp_accounting_for_poisson(acc):
    z, q, rounds, delta, N = 1.1, 0.02, 50, 1e-5, 1000
    got = accounting.epsilon(z, rounds, delta, "poisson", N, int(q * N), acc)
    direct = (dpa.rdp.RdpAccountant() if acc == "rdp" else dpa.pld.PLDAccountant())
    direct.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(
        q, dpa.GaussianDpEvent(z)), rounds))
    assert got == direct.get_epsilon(delta)


def test_epsilon_equals_dp_accounting_for_fixed_size_sampling():
    z, rounds, delta, N, K = 1.1, 50, 1e-5, 1000, 20
    got = accounting.epsilon(z, rounds, delta, "uniform", N, K)
    direct = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    # Replace-one: the clipped sum moves by up to 2C, so the multiplier is z / 2.
    direct.compose(dpa.SelfComposedDpEvent(dpa.SampledWithoutReplacementDpEvent(
        N, K, dpa.GaussianDpEvent(z / 2)), rounds))
    assert got == direct.get_epsilon(delta)
    assert got > accounting.epsilon(z, rounds, delta, "poisson", N, K)
    with pytest.raises(FedtextError, match="Poisson sampling only"):
        accounting.epsilon(z, rounds, delta, "uniform", N, K, "pld")


def test_accounting_keeps_dp_accountings_convergence_warnings_out_of_the_log(caplog):
    """At a small noise multiplier some Renyi orders do not converge: dp-accounting logs each
    (through absl) and drops it from the minimum. Expected, and noise in a training log."""
    accounting.epsilon.cache_clear()
    with caplog.at_level(logging.DEBUG):
        eps = accounting.epsilon(0.465564, 1, 1e-5, "poisson", 1154, 20)
    assert math.isfinite(eps) and eps > 0
    assert not [r for r in caplog.records if r.name == "absl"], caplog.text


def test_calibration_hits_the_target():
    z = accounting.calibrate(4.0, 100, 1e-5, "poisson", 1000, 20)
    assert accounting.epsilon(z, 100, 1e-5, "poisson", 1000, 20) == pytest.approx(4.0,
                                                                                  rel=2e-3)
    assert accounting.epsilon(z * 1.05, 100, 1e-5, "poisson", 1000, 20) < 4.0


@pytest.mark.parametrize("flags,match", [
    ({"dp": "fixed", "dp-noise-multiplier": "1"}, "--dp-clip C"),
    ({"dp": "fixed", "dp-clip": "1"}, "noise_multiplier needs a value"),
    ({"dp": "fixed", "dp-clip": "1", "dp-noise-multiplier": "-1"}, ">= 0"),
    ({"dp": "fixed", "dp-clip": "1", "dp-noise-multiplier": "1", "dp-target-epsilon": "3"},
     "not both"),
    ({"dp": "fixed", "dp-clip": "1", "dp-noise-multiplier": "1", "dp-delta": "1"}, "(0, 1)"),
])
def test_bad_dp_settings_are_one_line_errors(flags, match):
    with pytest.raises(FedtextError, match=match):
        merge(ExperimentConfig(), (FLAGS, flags))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_clients(tmp_path_factory.mktemp("data") / "clients", n=40, paragraphs=4)


def tiny(data, **flags):
    given = {"model": "scratch", "embed-dim": "8", "hidden-size": "16", "rounds": "4",
             "clients-per-round": "4", "max-batches": "2", "client-lr": "1.0", "seq-len": "30",
             "threads": "1", "data": str(data), "weighting": "uniform", "dp": "adaptive",
             "dp-noise-multiplier": "0.1", "dp-clip": "0.5", "dp-delta": "1e-3",
             "dp-count-stddev": "0.2", "eval-every": "2",
             **{k.replace("_", "-"): v for k, v in flags.items()}}
    return merge(ExperimentConfig(), (FLAGS, given))


def run(cfg, out, **kw):
    return train(cfg, out, progress=False, tensorboard=False, log=lambda s: None, **kw)


def test_dp_runs_log_epsilon_and_resume_bit_identically(data, tmp_path):
    cfg = tiny(data, sampling="poisson")
    full = run(cfg, tmp_path / "full")
    eps = [r["epsilon"] for r in full.rows if "epsilon" in r]
    assert len(eps) == 4 and eps == sorted(eps) and eps[0] > 0
    assert eps[-1] == accounting.epsilon(0.1, 4, 1e-3, "poisson", 40, 4)
    assert all("dp_clip" in r for r in full.rows[1:])
    run(cfg, tmp_path / "part", until_round=2)
    part = run(cfg, tmp_path / "part", resume=True)
    for k in full.state.params:
        assert torch.equal(full.state.params[k], part.state.params[k]), k
    assert [r.get("dp_next_clip") for r in part.rows] == [r.get("dp_next_clip")
                                                          for r in full.rows]


def test_target_epsilon_calibrates_before_training(data, tmp_path):
    given = {"model": "scratch", "embed-dim": "8", "hidden-size": "16", "rounds": "3",
             "clients-per-round": "4", "max-batches": "1", "seq-len": "30", "threads": "1",
             "data": str(data), "weighting": "uniform", "dp": "fixed", "dp-clip": "0.5",
             "dp-delta": "1e-3", "dp-target-epsilon": "8", "eval-every": "0"}
    res = run(merge(ExperimentConfig(), (FLAGS, given)), tmp_path / "cal")
    assert res.rows[-1]["epsilon"] == pytest.approx(8.0, rel=2e-3)  # the 3 planned rounds


def test_dp_refuses_what_would_break_the_guarantee(data, tmp_path):
    with pytest.raises(FedtextError, match="--weighting uniform"):
        run(tiny(data, weighting="tokens"), tmp_path / "a")
    with pytest.raises(FedtextError, match="must be below 1 / clients"):
        run(tiny(data, dp_delta="0.05"), tmp_path / "b")
    with pytest.raises(FedtextError, match="random clients"):
        run(tiny(data, sampling="weighted"), tmp_path / "c")
    with pytest.raises(FedtextError, match="clips and averages by itself"):
        run(tiny(data, clip_norm="1"), tmp_path / "d")
    assert P.global_norm({"w": torch.ones(1)}) == 1.0
    assert DPConfig().mode is None


def test_cli_privacy(capsys):
    from fedtext.cli.main import main

    assert main(["privacy", "--noise-multiplier", "1.1", "--clients-per-round", "20",
                 "--population", "1000", "--rounds", "50", "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["epsilon"] == accounting.epsilon(1.1, 50, 1e-5, "poisson", 1000, 20)
    assert main(["privacy", "--target-epsilon", "4", "--clients-per-round", "20",
                 "--population", "1000", "--rounds", "50", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epsilon"] == pytest.approx(4, rel=2e-3)
    for bad, msg in ((["--delta", "0.01"], "below 1 / clients"),
                     (["--clients-per-round", "2000"], "(0, 1]"),
                     (["--sampling", "uniform", "--accountant", "pld"], "Poisson sampling only")):
        argv = ["privacy", "--noise-multiplier", "1", "--clients-per-round", "20",
                "--population", "1000", "--rounds", "5", *bad]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and "\n" not in err.strip()
