"""Robust aggregation, attacks, dropouts, the non-finite filter and compression."""

import copy
import math

import pytest
import torch
from helpers import make_clients

from fedtext.config import FLAGS, ExperimentConfig, merge
from fedtext.data.batching import Batch
from fedtext.errors import FedtextError
from fedtext.fl import aggregators as A
from fedtext.fl import attacks, compression
from fedtext.fl import params as P
from fedtext.fl import robust as R
from fedtext.fl.algorithm import FaultConfig, fed_avg
from fedtext.fl.attacks import AttackConfig
from fedtext.fl.client import ClientResult
from fedtext.fl.compression import CompressionConfig
from fedtext.run.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _d(*v):
    return {"w": torch.tensor(v, dtype=torch.float64)}


def configs():
    for name in A.AGGREGATORS:
        yield name, A.AggregatorConfig(name=name, clip_norm=0.5 if name == "norm-bound" else None)


@pytest.mark.parametrize("name,cfg", list(configs()))
def test_contract_of_every_aggregator(name, cfg):
    """init -> aggregate x2: finite, same keys/shapes, inputs untouched, state advances."""
    agg = A.build(cfg)
    g = torch.Generator().manual_seed(0)
    like = {"a.weight": torch.zeros(3, 4), "a.bias": torch.zeros(4)}
    state = agg.init(like)
    for _ in range(2):
        pairs = [({k: torch.randn(v.shape, generator=g) for k, v in like.items()}, w)
                 for w in (1.0, 3.0, 2.0, 1.0, 1.0)]
        saved, old_state = [P.clone(d) for d, _ in pairs], copy.deepcopy(state)
        out, new_state = agg.aggregate(iter(pairs), state)
        assert list(out) == list(like)
        for k in like:
            assert out[k].shape == like[k].shape and torch.isfinite(out[k]).all()
        for (d, _), s in zip(pairs, saved):
            assert all(torch.equal(d[k], s[k]) for k in d)
        assert new_state != old_state
        state = new_state


def test_median_of_three_and_of_four():
    agg = R.median()
    out, _ = agg.aggregate([(_d(1, 10), 1), (_d(5, -3), 1), (_d(2, 7), 1)], agg.init(_d(0, 0)))
    assert out["w"].tolist() == [2.0, 7.0]
    out, _ = agg.aggregate([(_d(1.0), 1), (_d(4.0), 1), (_d(2.0), 1), (_d(100.0), 1)],
                           agg.init(_d(0)))
    assert out["w"].item() == 3.0  # even n: the mean of the middle two, as numpy / Flower


def test_trimmed_mean_with_ties():
    agg = R.trimmed_mean(0.2)  # 5 clients: drop 1 from each end per coordinate
    vals = [(_d(3.0, 1.0), 1), (_d(3.0, 1.0), 1), (_d(3.0, 5.0), 1), (_d(-50.0, 1.0), 1),
            (_d(3.0, 9.0), 1)]
    out, _ = agg.aggregate(vals, agg.init(_d(0, 0)))
    assert out["w"].tolist() == [3.0, pytest.approx(7 / 3)]  # [3,3,3]; [1,1,5]
    with pytest.raises(FedtextError):
        R.trimmed_mean(0.5)


def test_krum_picks_the_most_central_and_multi_krum_averages_the_best():
    pts = [_d(0.0, 0.0), _d(1.0, 0.0), _d(0.0, 1.0), _d(0.2, 0.1), _d(9.0, 9.0)]
    agg = R.krum(f=1)
    out, state = agg.aggregate([(p, 1) for p in pts], agg.init(pts[0]))
    # n - f - 2 = 2 nearest: [0.2, 0.1] has neighbours at 0.05 and 0.65 (sum 0.70), the best.
    assert out["w"].tolist() == [0.2, 0.1] and state.last_selected == (3,)
    multi = R.krum(f=1, m=2)
    out, state = multi.aggregate([(p, 1) for p in pts], multi.init(pts[0]))
    assert state.last_selected[0] == 3 and 4 not in state.last_selected
    with pytest.raises(FedtextError, match="more than 2f \\+ 2"):
        R.krum(f=2).aggregate([(p, 1) for p in pts], agg.init(pts[0]))


def test_geometric_median_resists_an_outlier():
    pts = [_d(1.0), _d(2.0), _d(3.0), _d(1000.0)]
    agg = R.geometric_median(iters=200)
    out, _ = agg.aggregate([(p, 1) for p in pts], agg.init(pts[0]))
    assert 2.0 <= out["w"].item() <= 3.0  # a 1-D geometric median is a median
    mean, _ = A.mean().aggregate([(p, 1) for p in pts], A.mean().init(pts[0]))
    assert mean["w"].item() > 200


def toy_client(global_params, client_data, config, seed):
    """client_data: the delta to send, or a callable raising (a broken device)."""
    del config, seed
    delta = client_data() if callable(client_data) else client_data
    m = {"loss_sum": 1.0, "correct": 1, "count": 10, "num_examples": 1, "num_batches": 1,
         "batch_loss_sum": 1.0}
    return ClientResult({"w": delta["w"] + 0 * global_params["w"]}, 10.0, m)


def test_a_nan_client_is_dropped_and_the_rest_averaged():
    clients = [("a", _d(1.0, 1.0)), ("bad", _d(float("nan"), 0.0)), ("b", _d(3.0, -1.0))]
    algo = fed_avg(None, client_fn=toy_client, weighting="uniform")
    for aggregator in (A.mean(), R.median(), R.geometric_median()):
        algo = fed_avg(None, aggregator=aggregator, client_fn=toy_client, weighting="uniform")
        state, m = algo.apply(algo.init(_d(0.0, 0.0)), clients)
        assert [d["client_id"] for d in m["dropped"]] == ["bad"]
        assert "non-finite" in m["dropped"][0]["reason"]
        assert state.params["w"].tolist() == [-2.0, 0.0]  # -mean([1,1], [3,-1])
    with pytest.raises(FedtextError, match="round 1: 0 of 1 clients returned a usable result"):
        algo.apply(algo.init(_d(0.0, 0.0)), [("bad", _d(float("inf"), 0.0))])


def test_attackers_are_seeded_and_counted():
    cfg = AttackConfig(kind="sign-flip", attackers="0.2")
    a = attacks.attacker_positions(cfg, seed=3, round=5, n=10)
    assert len(a) == 2 and a == attacks.attacker_positions(cfg, seed=3, round=5, n=10)
    assert a != attacks.attacker_positions(cfg, seed=3, round=6, n=10) or \
        a != attacks.attacker_positions(cfg, seed=4, round=5, n=10)
    assert len(attacks.attacker_positions(AttackConfig("nan", "3"), 0, 0, 10)) == 3
    assert attacks.parse_kind("scale:10") == ("scale", 10.0)
    for bad in ("scale", "gaussian:-1", "bogus", "nan:3"):
        with pytest.raises(FedtextError):
            attacks.parse_kind(bad)
    with pytest.raises(FedtextError, match="needs attackers"):
        AttackConfig(kind="nan")
    with pytest.raises(FedtextError, match=r"\[0, 1\]"):
        AttackConfig(kind="nan", attackers="1.5")


def test_attacks_change_what_the_server_gets():
    clients = [(str(i), _d(1.0)) for i in range(5)]
    base = fed_avg(None, client_fn=toy_client, weighting="uniform")
    clean, _ = base.apply(base.init(_d(0.0)), clients)
    for kind, expect in (("sign-flip", (4 - 1) / 5), ("scale:10", (4 + 10) / 5)):
        algo = fed_avg(None, client_fn=toy_client, weighting="uniform",
                       attack=AttackConfig(kind, "1"), seed=1)
        state, m = algo.apply(algo.init(_d(0.0)), clients)
        assert len(m["attackers"]) == 1
        assert -state.params["w"].item() == pytest.approx(expect)
    assert -clean.params["w"].item() == 1.0
    algo = fed_avg(None, client_fn=toy_client, weighting="uniform",
                   attack=AttackConfig("nan", "2"))
    _, m = algo.apply(algo.init(_d(0.0)), clients)
    assert len(m["dropped"]) == 2 and all("non-finite" in d["reason"] for d in m["dropped"])


def test_label_flip_mirrors_character_targets_only():
    y = torch.tensor([[0, 85, 86, 40]])
    b = Batch(y.clone(), y, torch.ones_like(y, dtype=torch.bool))
    flipped = attacks.FlippedLabels([b], 0, 86)(0, 0)[0]
    assert flipped.y.tolist() == [[85, 0, 86, 45]] and torch.equal(flipped.x, b.x)


def test_dropout_is_seeded_and_logged():
    clients = [(str(i), _d(1.0)) for i in range(20)]
    algo = fed_avg(None, client_fn=toy_client, weighting="uniform",
                   faults=FaultConfig(dropout=0.3), seed=2)
    _, m1 = algo.apply(algo.init(_d(0.0)), clients)
    _, m2 = algo.apply(algo.init(_d(0.0)), clients)
    assert m1["dropped"] == m2["dropped"] and 0 < len(m1["dropped"]) < 20
    assert all(d["reason"].startswith("dropped out") for d in m1["dropped"])
    assert m1["clients"] == 20 - len(m1["dropped"])


@pytest.mark.parametrize("bits,rotation", [(8, False), (4, False), (2, False), (2, True)])
def test_quantization_is_unbiased_with_bounded_error(bits, rotation):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 16, generator=g) * torch.linspace(0.1, 3, 1 << 16)
    outs = []
    for s in range(20):
        back, nbytes = compression.quantize_roundtrip(x, bits, torch.Generator().manual_seed(s),
                                                      rotation)
        outs.append(back)
        if not rotation:  # the error of one draw is below one level's width
            step = (x.max() - x.min()) / ((1 << bits) - 1)
            assert (back - x).abs().max() <= step * (1 + 1e-6)
    assert nbytes == math.ceil(x.numel() * bits / 8) + 8
    mean = torch.stack(outs).mean(0)
    err = (mean - x).abs().mean() / x.abs().mean()
    single = (outs[0] - x).abs().mean() / x.abs().mean()
    assert err < single / 3  # averaging draws converges to x: unbiased
    assert abs(float((outs[0] - x).mean())) < 4 * float((outs[0] - x).std()) / 2 ** 8


def test_rotation_shrinks_the_error_of_a_spiky_update():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1)) * 0.1
    x[7] = 100.0  # one coordinate stretches the plain quantizer's range
    plain, _ = compression.quantize_roundtrip(x, 2, torch.Generator().manual_seed(0))
    rot, _ = compression.quantize_roundtrip(x, 2, torch.Generator().manual_seed(0), True)
    assert (rot - x).norm() < (plain - x).norm()


def test_topk_keeps_the_largest_and_error_feedback_remembers():
    d = {"a": torch.tensor([0.1, -5.0, 0.2]), "b": torch.tensor([3.0, 0.0])}
    out, nbytes, residual = compression.topk_roundtrip(d, 0.4, None)  # k = 2
    assert out["a"].tolist() == [0.0, -5.0, 0.0] and out["b"].tolist() == [3.0, 0.0]
    assert nbytes == 16 and residual.tolist() == pytest.approx([0.1, 0, 0.2, 0, 0])
    out2, _, _ = compression.topk_roundtrip({"a": torch.zeros(3), "b": torch.zeros(2)}, 0.4,
                                            residual)
    assert out2["a"].tolist() == pytest.approx([0.1, 0.0, 0.2])  # what was held back comes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_clients(tmp_path_factory.mktemp("data") / "clients", n=12)


def tiny(data, **flags):
    given = {"model": "scratch", "embed-dim": "8", "hidden-size": "16", "rounds": "3",
             "clients-per-round": "6", "max-batches": "2", "client-lr": "1.0", "seq-len": "30",
             "threads": "1", "data": str(data), "eval-every": "3",
             **{k.replace("_", "-"): v for k, v in flags.items()}}
    return merge(ExperimentConfig(), (FLAGS, given))


def run(cfg, out, **kw):
    return train(cfg, out, progress=False, tensorboard=False, log=lambda s: None, **kw)


@pytest.mark.parametrize("flags", [
    {"attack": "gaussian:0.5", "attackers": "2", "aggregator": "median", "compression": "4",
     "compression_rotation": True},
    {"attack": "label-flip", "attackers": "0.3", "aggregator": "krum", "compression": "topk",
     "topk_fraction": "0.2", "error_feedback": True, "dropout": "0.2"},
])
def test_resume_is_bit_identical_with_attacks_and_compression(data, tmp_path, flags):
    cfg = tiny(data, **flags)
    full = run(cfg, tmp_path / "full")
    assert all(r["upload_bytes"] < r["upload_bytes_fp32"] for r in full.rows[1:])
    assert all(r.get("attackers") for r in full.rows[1:])
    run(cfg, tmp_path / "part", until_round=1)
    part = run(cfg, tmp_path / "part", resume=True)
    for k in full.state.params:
        assert torch.equal(full.state.params[k], part.state.params[k]), k
    assert CompressionConfig().method is None
