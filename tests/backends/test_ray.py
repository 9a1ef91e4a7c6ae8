"""The Ray backend: the same numbers as in process, a killed actor replaced, and a real
two-node Ray cluster on loopback (two `ray start` processes) computing the same weights."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
import torch
from helpers import make_clients

from fedtext.backends.base import ClientFailure, SequentialBackend
from fedtext.backends.ray import RayBackend
from fedtext.config import FLAGS, ExperimentConfig, merge
from fedtext.data.tasks import ClientData, DataConfig
from fedtext.fl.client import ClientConfig, client_update
from fedtext.model.char_rnn import CharRNN, ModelConfig
from fedtext.run.train import train

MC = ModelConfig(embed_dim=8, hidden_size=16)
RAY_BIN = Path(sys.executable).parent / "ray"
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_clients(tmp_path_factory.mktemp("data") / "clients", n=6)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray (2 CPUs) for the module: ray.init costs seconds. A short temp dir: Ray's
    socket paths may not exceed 107 bytes."""
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    os.environ.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"})
    ray.init(address="local", num_cpus=2, object_store_memory=256 << 20, _temp_dir=tmp,
             include_dashboard=False, log_to_driver=False, logging_level="warning")
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def backend(local_ray):
    """Two actors for one test (they hold the 2 CPUs while they live)."""
    with RayBackend(workers=2, threads=1) as b:
        yield b


def jobs_for(data, ids):
    cfg = DataConfig(source=str(data), seq_len=30)
    return [{"client_data": ClientData(str(data), c, cfg, 2), "seed": 5 + i}
            for i, c in enumerate(ids)]


def shared():
    torch.manual_seed(0)
    return {"global_params": CharRNN(MC).state_dict(), "config": ClientConfig(model=MC)}


def test_results_equal_in_process_ones_bit_for_bit(data, backend):
    jobs = jobs_for(data, [f"CLIENT_{i}" for i in range(5)] + ["NOBODY"])
    got = dict(backend.map(client_update, jobs, shared()))
    want = dict(SequentialBackend(threads=1).map(client_update, jobs, shared()))
    assert sorted(got) == list(range(6))
    assert isinstance(got[5], ClientFailure) and "unknown client 'NOBODY'" in got[5].reason
    for i in range(5):
        assert got[i].metrics == want[i].metrics
        assert all(torch.equal(got[i].delta[k], want[i].delta[k]) for k in want[i].delta)


def test_a_killed_actor_is_replaced_and_its_client_rerun(data, backend):
    jobs = jobs_for(data, [f"CLIENT_{i}" for i in range(6)])
    want = dict(SequentialBackend(threads=1).map(client_update, jobs, shared()))
    pids = backend.pids()
    os.kill(pids[0], signal.SIGKILL)  # dead before (or while) it takes a job of this round
    got = dict(backend.map(client_update, jobs, shared()))
    assert backend.restarts >= 1 and sorted(got) == list(range(6))
    for i in range(6):
        assert all(torch.equal(got[i].delta[k], want[i].delta[k]) for k in want[i].delta)


def tiny(data, **flags):
    given = {"model": "scratch", "embed-dim": "8", "hidden-size": "16", "rounds": "3",
             "clients-per-round": "3", "max-batches": "2", "client-lr": "1.0", "seq-len": "30",
             "threads": "1", "data": str(data), **flags}
    return merge(ExperimentConfig(), (FLAGS, given))


def run(cfg, out, **kw):
    return train(cfg, out, progress=False, tensorboard=False, log=lambda s: None, **kw)


def test_too_many_workers_is_an_error_not_a_hang(local_ray):
    from fedtext.errors import FedtextError

    with pytest.raises(FedtextError, match="free CPUs"):
        RayBackend(workers=3, threads=1)


def test_train_on_ray_equals_sequential_and_resumes(data, local_ray, tmp_path):
    seq = run(tiny(data), tmp_path / "seq")
    on_ray = run(tiny(data, backend="ray", workers="2"), tmp_path / "ray")  # joins the fixture's
    for k in seq.state.params:
        assert torch.equal(seq.state.params[k], on_ray.state.params[k]), k
    run(tiny(data, backend="ray"), tmp_path / "mixed", until_round=2)
    mixed = run(tiny(data), tmp_path / "mixed", resume=True,
                sources=[(FLAGS, {"backend": "sequential"})])
    for k in seq.state.params:
        assert torch.equal(seq.state.params[k], mixed.state.params[k]), k


def free_port(host):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def test_a_two_node_cluster_on_loopback_gives_the_same_weights(data, tmp_path):
    """`ray start --head` and a second `ray start --address`, as separate processes (one CPU
    each, on 127.0.0.2 and 127.0.0.3: Ray rewrites 127.0.0.1 to the machine's address), then
    `fedtext train --backend ray --ray-address` in a third process."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    port = free_port("127.0.0.2")
    common = ["--num-cpus=1", "--object-store-memory=134217728", "--disable-usage-stats",
              "--block"]
    nodes = []
    try:
        nodes.append(subprocess.Popen(
            [str(RAY_BIN), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.2",
             "--include-dashboard=false", f"--temp-dir={tmp}", *common], env=env,
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        address = f"127.0.0.2:{port}"
        probe = ("import ray,sys,time\nray.init(address=sys.argv[1], log_to_driver=False)\n"
                 "t=time.time()\nwhile len([n for n in ray.nodes() if n['Alive']])<int("
                 "sys.argv[2]) and time.time()-t<60: time.sleep(0.5)\n"
                 "print(len([n for n in ray.nodes() if n['Alive']]))")

        def alive(n):
            out = subprocess.run([sys.executable, "-c", probe, address, str(n)], env=env,
                                 capture_output=True, text=True, timeout=120)
            return int(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else 0

        deadline = time.time() + 90
        while time.time() < deadline and nodes[0].poll() is None:
            try:
                if alive(1) >= 1:
                    break
            except (subprocess.TimeoutExpired, ValueError):
                pass
            time.sleep(1)
        nodes.append(subprocess.Popen(
            [str(RAY_BIN), "start", f"--address={address}", "--node-ip-address=127.0.0.3",
             *common], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL))
        assert alive(2) == 2
        argv = [sys.executable, "-m", "fedtext", "train", "--model", "scratch", "--embed-dim",
                "8", "--hidden-size", "16", "--rounds", "2", "--clients-per-round", "4",
                "--max-batches", "2", "--client-lr", "1.0", "--seq-len", "30", "--threads",
                "1", "--data", str(data), "--no-progress", "--no-tensorboard"]
        r = subprocess.run(argv + ["--out", str(tmp_path / "cluster"), "--backend", "ray",
                                   "--workers", "2", "--ray-address", address],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        r = subprocess.run(argv + ["--out", str(tmp_path / "here")], env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    finally:
        for p in reversed(nodes):  # SIGTERM to `ray start --block` stops its node cleanly
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(nodes):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
    from fedtext.model.checkpoint import load_checkpoint

    a, _ = load_checkpoint(tmp_path / "cluster" / "final")
    b, _ = load_checkpoint(tmp_path / "here" / "final")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
