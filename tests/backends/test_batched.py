"""Batched clients (fedtext.fl.batched, BatchedBackend): the numbers of one-by-one client_update.

Tolerances. float32 rounding grows over a client's steps, and fedtext's one-by-one paths
already disagree among themselves by more than 1e-5 after 6 local steps (the C kernel vs the
"reference" recurrence: up to 4e-5 of a delta tensor's norm, 2e-4 of its largest entry). The
grouped model computes the reference equations, so the float32 checks are: batched within 2e-5
(of each delta tensor's norm) and 1e-4 (of its largest entry) of client_update(impl="reference")
(often bitwise equal when no batch needs padding); and batched no further from the default
client_update (the kernel) than a client's reference path is from it (x 1.5, + 2e-5 / 1e-4).
The bounds are per client, not per tensor: one tensor can come out bitwise equal on two paths
by chance (seen on an AVX2 EPYC), which says nothing about the rounding of the others.
float64, the check that would catch a wrong step or a mishandled padded row: near-exact vs the
default path, 1e-10.
"""

import math
from dataclasses import dataclass, replace

import pytest
import torch

from fedtext.backends.base import BACKENDS, BackendConfig, ClientFailure, SequentialBackend, build
from fedtext.backends.batched import BatchedBackend
from fedtext.data.batching import Batch
from fedtext.errors import FedtextError
from fedtext.fl.algorithm import FaultConfig, fed_avg
from fedtext.fl.batched import batched_client_updates
from fedtext.fl.client import METRIC_SUMS, ClientConfig, client_update
from fedtext.model.char_rnn import CharRNN, Compute, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")
V = 12
COUNTS = ("correct", "count", "num_examples", "num_batches")


def batch(seed, B=4, T=6, pad_rows=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[B - pad_rows:] = False  # all-padding rows, as a client's last batch has
    return Batch(x, y, mask)


@dataclass(frozen=True)
class EpochData:
    """A callable client_data (as tasks.ClientData): other batches every epoch and seed."""

    n: int  # batches per epoch
    key: int = 0
    fail: bool = False

    def __call__(self, epoch, seed):
        if self.fail:
            raise OSError(f"client {self.key}: no such file")
        return [batch(self.key * 100 + epoch * 10 + seed % 7 + i, pad_rows=i % 3)
                for i in range(self.n)]


# Uneven clients: 1..4 batches, padded rows, one client with smaller (B, T), one with none.
CLIENTS = [
    [batch(1)],
    [batch(2), batch(3), batch(4, pad_rows=2)],
    [],
    [batch(5), batch(6, pad_rows=3), batch(7), batch(8, pad_rows=1)],
    [batch(9, B=2, T=4), batch(10, B=3, T=5, pad_rows=1)],
    EpochData(3, key=1),
]
SEEDS = [3, 1, 4, 1, 5, 9]

MODELS = {
    "gru": ModelConfig(vocab_size=V, embed_dim=8, hidden_size=16),
    "gru-2layer": ModelConfig(vocab_size=V, embed_dim=8, hidden_size=16, num_layers=2),
    "gru-reset-before-2layer": ModelConfig(vocab_size=V, embed_dim=8, hidden_size=16,
                                           num_layers=2, reset_after=False),
    "lstm": ModelConfig(vocab_size=V, embed_dim=8, hidden_size=16, cell="lstm"),
    "lstm-2layer": ModelConfig(vocab_size=V, embed_dim=8, hidden_size=16, num_layers=2,
                               cell="lstm"),
}
OPTIMIZERS = {
    "sgd": dict(optimizer="sgd", lr=0.5),
    "momentum-prox": dict(optimizer="sgd", lr=0.3, momentum=0.9, prox_mu=0.1),
    "adam": dict(optimizer="adam", lr=0.01),
    "adagrad-prox": dict(optimizer="adagrad", lr=0.1, prox_mu=0.01),
}


def params_of(mc, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return {k: v.detach().to(dtype) for k, v in CharRNN(mc).state_dict().items()}


def rel_err(a, b):
    """Per tensor: max |a - b| / max |a| (0 where both are 0)."""
    out = {}
    for k in a:
        scale = a[k].abs().max().item()
        out[k] = (a[k] - b[k]).abs().max().item() / (scale or 1.0)
    return out


def one_by_one(gp, config, clients=CLIENTS, seeds=SEEDS):
    return [client_update(gp, d, config, s) for d, s in zip(clients, seeds)]


def assert_metrics(expected, got, rel):
    for k in METRIC_SUMS + ("loss", "accuracy", "tff_loss"):
        e, g = expected.metrics[k], got.metrics[k]
        if k in COUNTS:
            assert e == g, k
        elif math.isnan(e):
            assert math.isnan(g), k
        else:
            assert g == pytest.approx(e, rel=rel, abs=1e-12), k
    assert got.weight == expected.weight


def l2_err(a, b):
    """Per tensor: ||a - b|| / ||a|| (0 where both are 0)."""
    return {k: (a[k] - b[k]).norm().item() / (a[k].norm().item() or 1.0) for k in a}


def assert_float32_close(gp, cfg, clients, seeds, got):
    """got (batched) vs one-by-one client_update, to float32 rounding (module docstring)."""
    default = one_by_one(gp, cfg, clients, seeds)  # the C kernel here (or the torch path)
    reference = one_by_one(gp, replace(cfg, compute=Compute(impl="reference")), clients, seeds)
    assert len(got) == len(clients)
    for d, r, b in zip(default, reference, got):
        assert b.delta.keys() == d.delta.keys()
        assert all(v.dtype == gp[k].dtype and v.device == gp[k].device
                   for k, v in b.delta.items())
        # The same equations as the reference path (seen, Zen 4 / Zen 3: norm <= 4.2e-6 /
        # 9.3e-6, largest entry <= 1.6e-5 / 5.3e-5).
        assert max(l2_err(r.delta, b.delta).values()) <= 2e-5
        assert max(rel_err(r.delta, b.delta).values()) <= 1e-4
        # vs the default path: no further than the reference path is from it (seen: the kernel
        # vs the reference up to 1.3e-5 of the norm, 5.9e-5 of the largest entry, Zen 3).
        for err, own, floor in ((l2_err(d.delta, b.delta), l2_err(d.delta, r.delta), 2e-5),
                                (rel_err(d.delta, b.delta), rel_err(d.delta, r.delta), 1e-4)):
            worst, own_worst = max(err.values()), max(own.values())
            assert worst <= floor + 1.5 * own_worst, (worst, own_worst)
        assert_metrics(d, b, rel=1e-6)


@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("model", MODELS)
def test_float32_equals_one_by_one(model, opt):
    mc = MODELS[model]
    gp = params_of(mc)
    cfg = ClientConfig(model=mc, local_epochs=2, max_batches=3, **OPTIMIZERS[opt])
    assert_float32_close(gp, cfg, CLIENTS, SEEDS, batched_client_updates(gp, CLIENTS, cfg, SEEDS))


@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("model", ["gru", "gru-reset-before-2layer", "lstm-2layer"])
def test_float64_is_near_exact(model, opt):
    mc = MODELS[model]
    gp = params_of(mc, torch.float64)
    cfg = ClientConfig(model=mc, local_epochs=2, dtype="float64", **OPTIMIZERS[opt])
    for d, b in zip(one_by_one(gp, cfg), batched_client_updates(gp, CLIENTS, cfg, SEEDS)):
        assert max(rel_err(d.delta, b.delta).values()) <= 1e-10
        assert_metrics(d, b, rel=1e-12)


def test_client_without_batches_is_an_exact_no_op():
    mc = MODELS["gru"]
    gp = params_of(mc)
    cfg = ClientConfig(model=mc, momentum=0.9)
    a, empty, b = batched_client_updates(gp, [[batch(1)], [], [batch(2)] * 3], cfg, [0, 0, 0])
    assert all(torch.equal(v, torch.zeros_like(v)) for v in empty.delta.values())
    assert empty.weight == 0 and empty.metrics["num_batches"] == 0
    assert math.isnan(empty.metrics["loss"])
    # A group where nobody has data.
    (only,) = batched_client_updates(gp, [[]], cfg, [0])
    assert all(torch.equal(v, torch.zeros_like(v)) for v in only.delta.values())


def test_finished_clients_keep_their_weights_exactly():
    """A client that is done takes no step while the others go on (momentum would move it)."""
    mc = MODELS["lstm"]
    gp = params_of(mc, torch.float64)
    cfg = ClientConfig(model=mc, momentum=0.9, prox_mu=0.5, dtype="float64")
    short, _ = batched_client_updates(gp, [[batch(1)], [batch(2)] * 4], cfg, [0, 0])
    alone = client_update(gp, [batch(1)], cfg, 0)
    for k in gp:
        torch.testing.assert_close(short.delta[k], alone.delta[k], rtol=1e-12, atol=1e-15)


def _round(backend, mc, clients, seed=0, rounds=2, faults=None, dtype="float32"):
    cfg = ClientConfig(model=mc, optimizer="adam", lr=0.01, local_epochs=2, dtype=dtype)
    algorithm = fed_avg(cfg, backend=backend, seed=seed, faults=faults or FaultConfig())
    state = algorithm.init(params_of(mc))
    for _ in range(rounds):
        state, metrics = algorithm.apply(state, clients)
    return state, metrics


def test_fed_avg_over_batched_equals_sequential():
    mc = MODELS["gru-2layer"]
    clients = [(f"c{i}", d) for i, d in enumerate(CLIENTS)] + [("e", EpochData(2, key=2))]
    for dtype, tol in (("float64", 1e-6), ("float32", 1e-4)):  # params are float32 either way
        seq, m_seq = _round(SequentialBackend(), mc, clients, dtype=dtype)
        with build(BackendConfig(name="batched", group_size=3)) as backend:  # 3 groups
            assert isinstance(backend, BatchedBackend) and backend.group_size == 3
            bat, m_bat = _round(backend, mc, clients, dtype=dtype)
        for k, v in seq.params.items():
            err = (bat.params[k] - v).abs().max().item()
            assert err <= tol * max(v.abs().max().item(), 1e-3), (dtype, k, err)
        assert m_bat["clients"] == m_seq["clients"] == len(clients)
        for k in ("chars", "num_examples", "num_batches"):
            assert m_bat[k] == m_seq[k]
        assert m_bat["train_loss"] == pytest.approx(m_seq["train_loss"], rel=1e-5)


def test_failing_clients_are_dropped_and_the_rest_of_their_group_trains():
    mc = MODELS["gru"]
    gp = params_of(mc)
    cfg = ClientConfig(model=mc)
    bad_ids = Batch(torch.full((2, 3), V), torch.zeros(2, 3, dtype=torch.long),
                    torch.ones(2, 3, dtype=torch.bool))  # an id outside the vocabulary
    datas = [[batch(1)], EpochData(2, key=3, fail=True), [batch(2), batch(3)], [bad_ids]]
    jobs = [{"client_data": d, "seed": s} for d, s in zip(datas, [1, 2, 3, 4])]
    out = dict(BatchedBackend(group_size=4).map(client_update, jobs,
                                               {"global_params": gp, "config": cfg}))
    assert isinstance(out[1], ClientFailure) and "OSError: client 3" in out[1].reason
    assert isinstance(out[3], ClientFailure) and "outside [0, 12)" in out[3].reason
    assert_float32_close(gp, cfg, [datas[0], datas[2]], [1, 3], [out[0], out[2]])
    # The round goes on without them (drop), naming them.
    clients = [(f"c{i}", d) for i, d in enumerate(datas)]
    _, metrics = _round(BatchedBackend(group_size=4), mc, clients, rounds=1,
                        faults=FaultConfig(on_client_error="drop"))
    assert [d["client_id"] for d in metrics["dropped"]] == ["c1", "c3"]
    assert metrics["clients"] == 2


def test_group_whose_training_fails_is_rerun_one_by_one():
    mc = MODELS["gru"]
    gp = params_of(mc)
    gp_bad = {**gp, "head.bias": gp["head.bias"][:-1]}  # params that don't fit the model
    jobs = [{"client_data": [batch(1)], "seed": 0}, {"client_data": [batch(2)], "seed": 1}]
    out = list(BatchedBackend().map(client_update, jobs,
                                    {"global_params": gp_bad, "config": ClientConfig(model=mc)}))
    assert [i for i, _ in out] == [0, 1]
    assert all(isinstance(r, ClientFailure) for _, r in out)


def test_timeout_applies_to_a_whole_group_after_the_fact():
    mc = MODELS["gru"]
    shared = {"global_params": params_of(mc), "config": ClientConfig(model=mc)}
    jobs = [{"client_data": [batch(i)], "seed": i} for i in range(3)]
    out = list(BatchedBackend(group_size=2).map(client_update, jobs, shared, timeout=1e-9))
    assert [i for i, _ in out] == [0, 1, 2]
    assert all(isinstance(r, ClientFailure) and "timed out (its group of" in r.reason
               for _, r in out)


def test_other_functions_run_one_job_at_a_time_and_order_is_kept():
    calls = []

    def fn(global_params, client_data, config, seed):
        calls.append(seed)
        if seed == 2:
            raise ValueError("no")
        return seed * 10

    jobs = [{"client_data": None, "seed": s} for s in range(4)]
    out = list(BatchedBackend(group_size=2).map(fn, jobs, {"global_params": {}, "config": None}))
    assert [i for i, _ in out] == [0, 1, 2, 3] and calls == [0, 1, 2, 3]
    assert out[0][1] == 0 and isinstance(out[2][1], ClientFailure)


def test_device_comes_from_the_config_or_the_backend():
    mc = MODELS["gru"]
    gp = params_of(mc)
    jobs = [{"client_data": [batch(1)], "seed": 0}]
    cfg = ClientConfig(model=mc, device="cpu")
    for backend in (BatchedBackend(), BatchedBackend(device="cpu")):
        ((_, r),) = backend.map(client_update, jobs, {"global_params": gp, "config": cfg})
        assert all(v.device.type == "cpu" for v in r.delta.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_equals_one_by_one_on_cuda():
    torch.backends.cudnn.allow_tf32 = False  # one-by-one runs cuDNN: keep it fp32
    torch.backends.cuda.matmul.allow_tf32 = False
    mc = MODELS["lstm-2layer"]
    gp = {k: v.cuda() for k, v in params_of(mc).items()}
    cfg = ClientConfig(model=mc, local_epochs=2, device="cuda", optimizer="adam", lr=0.01)
    reference = one_by_one(gp, replace(cfg, compute=Compute(impl="reference")))
    for r, b in zip(reference, batched_client_updates(gp, CLIENTS, cfg, SEEDS)):
        assert all(v.is_cuda for v in b.delta.values())
        assert max(rel_err(r.delta, b.delta).values()) <= 1e-4
        assert_metrics(r, b, rel=1e-5)


def test_unsupported_settings_and_config_errors():
    mc = MODELS["gru"]
    shared = {"global_params": params_of(mc),
              "config": ClientConfig(model=mc, compute=Compute(precision="bf16"))}
    jobs = [{"client_data": [batch(1)], "seed": 0}]
    with pytest.raises(FedtextError, match="fp32 only"):
        list(BatchedBackend().map(client_update, jobs, shared))
    with pytest.raises(FedtextError, match="model is not set"):
        batched_client_updates({}, [[batch(1)]], ClientConfig(), [0])
    with pytest.raises(FedtextError, match="group_size must be >= 1"):
        BatchedBackend(group_size=0)
    with pytest.raises(FedtextError, match="group_size must be >= 1"):
        BackendConfig(name="batched", group_size=0)
    assert BackendConfig(group_size=4).name == "sequential"  # ignored: a resume may switch
    assert "batched" in BACKENDS.names
    assert build(BackendConfig(name="batched")).group_size == 32


def test_fedtext_train_with_backend_batched(tmp_path):
    from helpers import make_clients

    from fedtext.cli.main import main
    from fedtext.model.checkpoint import load_checkpoint

    data = make_clients(tmp_path / "clients", n=5)
    tiny = ["--data", data, "--model", "scratch", "--embed-dim", "8", "--hidden-size", "16",
            "--rounds", "2", "--clients-per-round", "4", "--max-batches", "2", "--seq-len", "40",
            "--threads", "1", "--no-progress", "--no-tensorboard"]
    runs = {}
    for name, flags in (("sequential", []), ("batched", ["--backend", "batched",
                                                         "--group-size", "3"])):
        assert main([str(a) for a in ["train", "--out", tmp_path / name, *tiny, *flags]]) == 0
        runs[name] = load_checkpoint(tmp_path / name / "final")[0].state_dict()
    for k, v in runs["sequential"].items():
        assert (runs["batched"][k] - v).abs().max() <= 1e-4 * v.abs().max(), k
