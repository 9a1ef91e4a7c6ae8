"""The process backend: the same numbers as in process, faults handled, memory bounded."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import make_clients

from fedtext.backends.base import ClientFailure, SequentialBackend
from fedtext.backends.processes import ProcessBackend
from fedtext.config import FLAGS, ExperimentConfig, merge
from fedtext.data.tasks import ClientData, DataConfig
from fedtext.fl.client import ClientConfig, client_update
from fedtext.model.char_rnn import CharRNN, ModelConfig
from fedtext.run.train import train

MC = ModelConfig(embed_dim=8, hidden_size=16)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_clients(tmp_path_factory.mktemp("data") / "clients", n=6)


@pytest.fixture(scope="module")
def backend():
    with ProcessBackend(workers=2, threads=1) as b:
        yield b


def jobs_for(data, ids, max_batches=2):
    cfg = DataConfig(source=str(data), seq_len=30)
    return [{"client_data": ClientData(str(data), c, cfg, max_batches), "seed": 11 + i}
            for i, c in enumerate(ids)]


def slow_on_first_call(global_params, client_data, config, seed, marker):
    """client_update, but the first call anywhere writes its pid to `marker` and sleeps (so a
    test can kill that worker mid-job); later calls run normally."""
    if not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        time.sleep(30)
    return client_update(global_params, client_data, config, seed)


def sleepy(global_params, client_data, config, seed, sleep_for):
    time.sleep(sleep_for)
    return client_update(global_params, client_data, config, seed)


def shared():
    torch.manual_seed(0)
    return {"global_params": CharRNN(MC).state_dict(), "config": ClientConfig(model=MC)}


def test_results_equal_in_process_ones_bit_for_bit(data, backend):
    jobs = jobs_for(data, [f"CLIENT_{i}" for i in range(5)])
    got = dict(backend.map(client_update, jobs, shared()))
    want = dict(SequentialBackend(threads=1).map(client_update, jobs, shared()))
    assert sorted(got) == list(range(5))
    for i in range(5):
        assert got[i].metrics == want[i].metrics
        assert all(torch.equal(got[i].delta[k], want[i].delta[k]) for k in want[i].delta)


def test_a_failing_client_is_a_failure_value(data, backend):
    jobs = jobs_for(data, ["CLIENT_0", "NOBODY"])
    got = dict(backend.map(client_update, jobs, shared()))
    assert isinstance(got[1], ClientFailure) and "unknown client 'NOBODY'" in got[1].reason
    assert not isinstance(got[0], ClientFailure)


def test_a_killed_worker_is_replaced_and_its_client_rerun(data, tmp_path):
    marker = tmp_path / "marker"
    jobs = [dict(j, marker=str(marker)) for j in jobs_for(data, ["CLIENT_0", "CLIENT_1"])]

    def killer():
        deadline = time.time() + 60
        while time.time() < deadline:
            if marker.exists() and marker.read_text():
                os.kill(int(marker.read_text()), signal.SIGKILL)
                return
            time.sleep(0.05)

    with ProcessBackend(workers=2, threads=1) as b:
        t = threading.Thread(target=killer)
        t.start()
        got = dict(b.map(slow_on_first_call, jobs, shared()))
        t.join()
        assert b.restarts == 1
    want = dict(SequentialBackend(threads=1).map(
        client_update, [{k: v for k, v in j.items() if k != "marker"} for j in jobs], shared()))
    for i in (0, 1):
        assert all(torch.equal(got[i].delta[k], want[i].delta[k]) for k in want[i].delta)


def test_a_straggler_times_out(data):
    jobs = jobs_for(data, ["CLIENT_0", "CLIENT_1"])
    jobs[0]["sleep_for"], jobs[1]["sleep_for"] = 120.0, 0.0
    with ProcessBackend(workers=2, threads=1) as b:
        list(b.map(sleepy, [dict(jobs[1])] * 2, shared()))  # models built, store opened
        t0 = time.monotonic()
        got = dict(b.map(sleepy, jobs, shared(), timeout=20.0))  # generous: a loaded CI
        assert time.monotonic() - t0 < 90  # the straggler was not waited for
    assert isinstance(got[0], ClientFailure) and "timed out" in got[0].reason
    assert not isinstance(got[1], ClientFailure)


def tiny(data, **flags):
    given = {"model": "scratch", "embed-dim": "8", "hidden-size": "16", "rounds": "3",
             "clients-per-round": "3", "max-batches": "3", "client-lr": "1.0", "seq-len": "30",
             "threads": "1", "data": str(data), **flags}
    return merge(ExperimentConfig(), (FLAGS, given))


def run(cfg, out, **kw):
    return train(cfg, out, progress=False, tensorboard=False, log=lambda s: None, **kw)


@pytest.mark.slow
def test_sequential_and_processes_train_bit_identical_runs_and_resume(data, tmp_path):
    seq = run(tiny(data), tmp_path / "seq")
    pro = run(tiny(data, backend="processes", workers="2"), tmp_path / "pro")
    for k in seq.state.params:
        assert torch.equal(seq.state.params[k], pro.state.params[k]), k
    strip = ("seconds", "train_seconds", "eval_seconds", "chars_per_s")
    assert [{k: v for k, v in r.items() if k not in strip} for r in seq.rows] == \
        [{k: v for k, v in r.items() if k not in strip} for r in pro.rows]
    # Stop a processes run after round 1 and finish it in process: still the same weights.
    run(tiny(data, backend="processes"), tmp_path / "mixed", until_round=1)
    mixed = run(tiny(data), tmp_path / "mixed", resume=True,
                sources=[(FLAGS, {"backend": "sequential"})])
    for k in seq.state.params:
        assert torch.equal(seq.state.params[k], mixed.state.params[k]), k


@pytest.mark.parametrize("make_backend", [lambda: SequentialBackend(threads=1),
                                          lambda: ProcessBackend(workers=2, threads=1)])
def test_a_failing_client_is_dropped_and_named_or_fails_the_round(data, make_backend):
    from fedtext.errors import FedtextError
    from fedtext.fl.algorithm import FaultConfig, fed_avg

    cfg = DataConfig(source=str(data), seq_len=30, shuffle=False)  # seeds follow positions
    clients = [(c, ClientData(str(data), c, cfg, 2)) for c in ("CLIENT_0", "GHOST", "CLIENT_1")]
    params = shared()["global_params"]
    backend = make_backend()
    try:
        drop = fed_avg(ClientConfig(model=MC), backend=backend,
                       faults=FaultConfig(on_client_error="drop"))
        state, m = drop.apply(drop.init(params), clients)
        assert [d["client_id"] for d in m["dropped"]] == ["GHOST"]
        assert "unknown client 'GHOST'" in m["dropped"][0]["reason"] and m["clients"] == 2
        alone = fed_avg(ClientConfig(model=MC), backend=backend)
        ref, _ = alone.apply(alone.init(params), [clients[0], clients[2]])
        assert all(torch.equal(state.params[k], ref.params[k]) for k in params)
        with pytest.raises(FedtextError, match="round 1: client GHOST failed: .*unknown"):
            alone.apply(alone.init(params), clients)
        strict = fed_avg(ClientConfig(model=MC), backend=backend,
                         faults=FaultConfig(on_client_error="drop", min_clients=3))
        with pytest.raises(FedtextError, match="2 of 3 clients returned a usable result, "
                                               "fewer than min_clients=3 .dropped: GHOST"):
            strict.apply(strict.init(params), clients)
    finally:
        backend.close()
