"""The Flower adapter: messages round-trip exactly; the ServerApp over nodes answered by the
real ClientApp in this process equals the simulator bit for bit (and drops a node that is
silent or has bad data); and over Flower's real deployment engine on loopback, with TLS:
SuperLink + 3 SuperNodes as separate processes equal the simulation, a SuperNode killed in
round 2 is dropped and named, a killed ServerApp resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from uuid import uuid4

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from helpers import make_clients  # noqa: E402

from fedtext.backends.base import ClientFailure  # noqa: E402
from fedtext.backends.flower import client_app, commands, server_app  # noqa: E402
from fedtext.backends.flower import messages as M  # noqa: E402
from fedtext.backends.flower.backend import FlowerBackend  # noqa: E402
from fedtext.config import FLAGS, ExperimentConfig, merge  # noqa: E402
from fedtext.data.tasks import ClientData, DataConfig  # noqa: E402
from fedtext.fl.client import ClientConfig, client_update  # noqa: E402
from fedtext.fl.schedules import ScheduleConfig  # noqa: E402
from fedtext.model.char_rnn import CharRNN, Compute, ModelConfig  # noqa: E402
from fedtext.run.evaluation import evaluate_client  # noqa: E402
from fedtext.run.train import run_rows, train  # noqa: E402

MC = ModelConfig(embed_dim=8, hidden_size=16)
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"model": "scratch", "embed-dim": "8", "hidden-size": "16", "rounds": "2",
        "clients-per-round": "3", "max-batches": "2", "client-lr": "1.0", "seq-len": "30",
        "threads": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """CLIENT_0..2 together (the simulator's data) and one directory per node holding only its
    own client's file; and a node directory whose file is not UTF-8."""
    root = tmp_path_factory.mktemp("flower-data")
    everyone = make_clients(root / "all", n=3)
    nodes = []
    for i in range(3):
        d = root / f"node{i}"
        d.mkdir()
        (d / f"CLIENT_{i}.txt").write_bytes((everyone / f"CLIENT_{i}.txt").read_bytes())
        nodes.append(d)
    bad = root / "bad"
    bad.mkdir()
    (bad / "CLIENT_X.txt").write_bytes(b"fine so far\n\n\xff\xfe not UTF-8\n")
    return SimpleNamespace(all=everyone, nodes=nodes, bad=bad)


def simulate(data, out, **flags):
    cfg = merge(ExperimentConfig(), (FLAGS, {**TINY, "data": str(data.all), **flags}))
    return train(cfg, out, progress=False, tensorboard=False, log=lambda s: None)


def same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- messages


def test_a_job_survives_its_json_with_the_nodes_own_source():
    config = ClientConfig(optimizer="adam", lr=0.01, local_epochs=2, max_batches=3,
                          prox_mu=0.1, schedule=ScheduleConfig(kind="cosine", warmup=2),
                          model=MC, compute=Compute(impl="torch"), dtype="float64")
    cd = ClientData("shakespeare", "KING_LEAR_KENT", DataConfig(seq_len=30, batch_size=4), 3,
                    "test", "/server/cache")
    text = M.job_to_json({"client_data": cd, "seed": 12345}, config, threads=2)
    assert "shakespeare" not in text and "/server/cache" not in text  # the node's own
    job = M.job_from_json(text, "/node/data", "/node/cache")
    assert job["config"] == config and job["seed"] == 12345 and job["threads"] == 2
    assert job["client_data"] == ClientData("/node/data", "KING_LEAR_KENT",
                                            DataConfig("/node/data", seq_len=30, batch_size=4),
                                            3, "test", "/node/cache")


def test_records_carry_params_deltas_and_sums_exactly(data):
    torch.manual_seed(0)
    params = CharRNN(MC).state_dict()
    cd = ClientData(str(data.all), "CLIENT_1", DataConfig(str(data.all), seq_len=30), 2)
    result = client_update(params, cd, ClientConfig(model=MC), 7)
    back = M.read_train_reply(M.train_reply(result))
    same_weights(back.delta, result.delta)
    assert back.weight == result.weight and back.metrics == result.metrics
    content = M.instruction(M.params_record(params), "{}")
    got, job = M.read_instruction(content)
    same_weights(got, params)
    assert job == "{}" and content["arrays"].count_bytes() >= 4 * sum(
        v.numel() for v in params.values())
    sums = evaluate_client(params, cd, ClientConfig(model=MC), 0)
    assert M.read_eval_reply(M.eval_reply(sums)) == sums


# ----------------------------------------------------------------------------- in process


@pytest.fixture
def server_identity():
    """What flwr-serverapp sets before a ServerApp builds messages."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


class LocalGrid:
    """A Grid whose nodes live in this process: each message goes to the real ClientApp with
    that node's config. `silent` nodes never answer; `breaks` gives a node a new config once
    the run's first non-query message reaches it (its data went bad mid-run)."""

    def __init__(self, nodes: dict[int, dict], silent=(), breaks: dict | None = None):
        self.nodes, self.silent, self.breaks = nodes, set(silent), dict(breaks or {})
        self.replies, self.run = {}, SimpleNamespace(run_id=1)
        self.sent: list[str] = []

    def get_nodes(self):
        return [SimpleNamespace(node_id=n, status="online") for n in self.nodes]

    def push_messages(self, msgs):
        ids = []
        for m in msgs:
            mid = uuid4().hex
            m.metadata.__dict__["_message_id"] = mid  # as Flower's HttpGrid does
            node = m.metadata.dst_node_id
            self.sent.append(m.metadata.message_type)
            if m.metadata.message_type != "query" and node in self.breaks:
                self.nodes[node] = self.breaks.pop(node)
            if node not in self.silent:
                ctx = Context(1, node, self.nodes[node], RecordDict(), {})
                self.replies[mid] = client_app.app(m, ctx)
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def serve(grid, out, log, rc=None, **flags):
    rc = {"sources": json.dumps([[FLAGS, {**TINY, **flags}]]), "out": str(out),
          "resume": False, "min-nodes": 0, "wait-nodes": 1.0, "command": "test", **(rc or {})}
    file_log = server_app.RunLog(out)  # stdout and out/flower.log, as in the ServerApp

    def both(line):
        log(line)
        file_log(line)

    server_app.run(grid, rc, out, both)
    return run_rows(out)


def test_the_server_app_over_local_nodes_equals_the_simulation(data, tmp_path,
                                                               server_identity):
    """The ServerApp's train() over three nodes (each sees only its own directory; a fourth
    has bad data and is left out, logged) gives the simulator's weights and rows."""
    nodes = {10 + i: {"data-path": str(d), "threads": 1} for i, d in enumerate(data.nodes)}
    nodes[99] = {"data-path": str(data.bad)}
    lines = []
    rows = serve(LocalGrid(nodes), tmp_path / "fl", lines.append)
    sim = simulate(data, tmp_path / "sim")
    from fedtext.model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(tmp_path / "fl" / "final")
    same_weights(model.state_dict(), sim.state.params)
    for a, b in zip(rows, sim.rows):
        for k in ("client_ids", "train_loss", "train_accuracy", "chars", "delta_norm"):
            assert a.get(k) == b.get(k), k
        for k in ("eval_loss", "eval_accuracy", "eval_accuracy_p50", "eval_unweighted_loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-6), k
        assert a["eval_clients"] == b["eval_clients"] and a["eval_chars"] == b["eval_chars"]
    left_out = [s for s in lines if "node 99 left out" in s]
    assert left_out and "not valid UTF-8" in left_out[0]
    assert "node 99 left out" in (tmp_path / "fl" / server_app.LOG_FILE).read_text()


def test_a_silent_node_and_one_whose_data_breaks_are_dropped_and_named(data, tmp_path,
                                                                      server_identity):
    nodes = {10 + i: {"data-path": str(d), "threads": 1} for i, d in enumerate(data.nodes)}
    grid = LocalGrid(nodes, breaks={12: {"data-path": str(data.bad), "client-id": "CLIENT_2"}})
    lines = []
    (tmp_path / "a").mkdir()  # an empty run directory made beforehand is fine
    rows = serve(grid, tmp_path / "a", lines.append, **{
        "on-client-error": "drop", "min-clients": "2", "rounds": "1", "eval-every": "0"})
    assert rows[-1]["clients"] == 2
    (dropped,) = rows[-1]["dropped"]
    assert dropped["client_id"] == "CLIENT_2"
    assert "node 12 (client CLIENT_2)" in dropped["reason"] and "UTF-8" in dropped["reason"]
    assert any("node 12 (client CLIENT_2) failed" in s for s in lines)

    nodes = {10 + i: {"data-path": str(d), "threads": 1} for i, d in enumerate(data.nodes)}
    grid = LocalGrid(nodes)
    FlowerBackend.discover(backend := FlowerBackend(grid, log=lambda s: None))  # who is who
    grid.silent.add(11)
    cd = ClientData(M.NODE_SOURCE, "CLIENT_1", DataConfig(seq_len=30), 2)
    t0 = time.monotonic()
    ((i, r),) = backend.map(client_update, [{"client_data": cd, "seed": 0}],
                            {"global_params": CharRNN(MC).state_dict(),
                             "config": ClientConfig(model=MC)}, timeout=0.5)
    assert time.monotonic() - t0 < 5 and isinstance(r, ClientFailure)
    assert "node 11 (client CLIENT_1): no reply within 0.5 s" in r.reason


def test_by_hand_the_run_config_may_name_a_config_file(data, tmp_path, server_identity):
    """`flwr run ... --run-config "config='/abs/exp.toml' out='/abs/run'"`, no sources."""
    exp = tmp_path / "exp.toml"
    exp.write_text('[run]\nrounds = 1\n[model]\ninit = "scratch"\nembed_dim = 8\n'
                   'hidden_size = 16\n[sampling]\nclients_per_round = 2\n[eval]\nevery = 0\n')
    nodes = {10 + i: {"data-path": str(d)} for i, d in enumerate(data.nodes)}
    rows = serve(LocalGrid(nodes), tmp_path / "run", lambda s: None,
                 rc={"config": str(exp), "sources": "[]"})
    assert [(r["round"], r["clients"]) for r in rows] == [(1, 2)]


def test_the_backend_runs_only_what_a_node_can(data, server_identity):
    backend = FlowerBackend(LocalGrid({}), log=lambda s: None)
    with pytest.raises(Exception, match="client_update and evaluate_client"):
        list(backend.map(print, [{}], {"global_params": {}}))
    cd = ClientData(M.NODE_SOURCE, "NOBODY", DataConfig(), 2)
    ((i, r),) = backend.map(client_update, [{"client_data": cd, "seed": 0}],
                            {"global_params": CharRNN(MC).state_dict(),
                             "config": ClientConfig(model=MC)})
    assert isinstance(r, ClientFailure) and "no online node holds this client" in r.reason


# ----------------------------------------------------------------------------- commands


def test_commands_need_tls_or_an_explicit_insecure(tmp_path, capsys):
    from fedtext.cli.main import main

    assert main(["flower", "superlink", "--dry-run"]) == 2
    assert "--certs DIR" in capsys.readouterr().err
    assert main(["flower", "supernode", "--data", str(tmp_path), "--dry-run"]) == 2
    assert main(["flower", "certs", str(tmp_path / "c"), "--host", "10.1.2.3",
                 "--host", "fl.example.org"]) == 0
    capsys.readouterr()
    assert main(["flower", "superlink", "--certs", str(tmp_path / "c"), "--supernode-auth",
                 "--dry-run"]) == 0
    line = capsys.readouterr().out
    assert "flower-superlink --ssl-ca-certfile" in line and "--enable-supernode-auth" in line
    assert "--insecure" not in line
    assert main(["flower", "superlink", "--insecure", "--supernode-auth", "--dry-run"]) == 2
    assert main(["flower", "supernode", "--data", str(tmp_path), "--client-id", "A B",
                 "--ca", str(tmp_path / "c" / "ca.crt"), "--dry-run"]) == 0
    assert f"--node-config 'data-path=\"{tmp_path}\" client-id=\"A B\"'" in \
        capsys.readouterr().out


def test_certificates_verify_and_name_the_hosts(tmp_path):
    from cryptography import x509

    commands.make_certs(tmp_path, ["10.1.2.3", "fl.example.org"])
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "fl.example.org"} <= set(sans.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "10.1.2.3"} <= {str(a) for a in sans.get_values_for_type(
        x509.IPAddress)}
    assert (tmp_path / "server.key").stat().st_mode & 0o077 == 0
    pub = commands.make_keys(tmp_path / "keys", ["alice"])[1]
    assert pub.read_text().startswith("ecdsa-sha2-nistp384 ")


# ----------------------------------------------------------------------------- deployment
# Real Flower processes on loopback, TLS on: `fedtext flower superlink` and `supernode` (each
# execs flower-superlink / flower-supernode), `fedtext flower run` (flwr run). Each test has
# its own SuperLink on a free port and its own FLWR_HOMEs.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """pid's process tree (SuperLinks start their SuperExec in a session of its own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


class Federation:
    """A SuperLink and SuperNodes started with the fedtext CLI, each in a session of its own
    (so one node's whole process group can be killed), logs under root/logs."""

    def __init__(self, root: Path, certs: Path, auth: bool = False):
        self.root, self.certs, self.port = root, certs, free_port()
        self.superlink = f"127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        (root / "logs").mkdir(parents=True, exist_ok=True)
        self.start("superlink", ["superlink", "--certs", str(certs), "--port", str(self.port)]
                   + (["--supernode-auth"] if auth else []))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # its HTTPS port is up
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            assert self.procs["superlink"].poll() is None, self.log("superlink")
            time.sleep(0.2)

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.root / "logs" / f"{name}.log", "w")
        p = subprocess.Popen([str(BIN / "fedtext"), "flower", *argv, "--flwr-home",
                              str(self.root / "home" / name)], stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = p
        return p

    def node(self, name: str, data: Path, *extra: str) -> subprocess.Popen:
        return self.start(name, ["supernode", "--data", str(data), "--superlink",
                                 self.superlink, "--ca", str(self.certs / "ca.crt"),
                                 "--port", str(free_port()), "--threads", "1", *extra])

    def cli_async(self, *argv: str) -> subprocess.Popen:
        """A `fedtext flower` command that talks to the SuperLink (run, register)."""
        return subprocess.Popen([str(BIN / "fedtext"), "flower", *argv, "--superlink",
                                 self.superlink, "--ca", str(self.certs / "ca.crt"),
                                 "--flwr-home", str(self.root / "home" / "cli")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def cli(self, *argv: str, timeout: float = 400) -> subprocess.CompletedProcess:
        p = self.cli_async(*argv)
        try:
            out, _ = p.communicate(timeout=timeout)
        finally:
            if p.poll() is None:
                p.kill()
        return subprocess.CompletedProcess(p.args, p.returncode, out, "")

    def train(self, out: Path, *flags: str, timeout: float = 400):
        given = [x for k, v in TINY.items() for x in (f"--{k}", v)]
        return self.cli("run", "--out", str(out), *given, *flags, timeout=timeout)

    def log(self, name: str) -> str:
        return (self.root / "logs" / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str) -> None:
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(10)

    def stop(self) -> None:
        tree = [q for p in self.procs.values() for q in descendants(p.pid)]
        for p in self.procs.values():  # SIGTERM: SuperNodes and the SuperLink stop cleanly
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                pass
        for q in tree:  # whatever is left (a SuperExec in its own session, a zombie's peer)
            try:
                os.kill(q, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    commands.make_certs(d)
    return d


@pytest.fixture
def federation(tmp_path, certs):
    started = []

    def make(**kw):
        started.append(Federation(tmp_path, certs, **kw))
        return started[-1]

    yield make
    for f in started:
        f.stop()


def wait_for_row(out: Path, round: int, proc: subprocess.Popen | None = None,
                 seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(r.get("round") == round and "train_loss" in r
               for r in (run_rows(out) if (out / "metrics.jsonl").exists() else [])):
            return
        assert proc is None or proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"no round {round} row in {out} after {seconds} s")


@pytest.mark.slow
def test_three_supernodes_over_tls_train_what_the_simulator_trains(data, tmp_path,
                                                                  federation):
    """SuperLink + 3 SuperNodes (each with one client's directory) + one whose data is not
    UTF-8: 2 rounds over TLS give the in-process simulation's weights bit for bit, and the
    ServerApp logs the bad node's error and trains without it."""
    fed = federation()
    for i, d in enumerate(data.nodes):
        fed.node(f"node{i}", d)
    fed.node("bad", data.bad)
    t0 = time.monotonic()
    r = fed.train(tmp_path / "fl", "--eval-every", "2")  # evaluated before and at the end
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "finished:completed" in r.stdout
    sim = simulate(data, tmp_path / "sim", **{"eval-every": "2"})
    from fedtext.model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(tmp_path / "fl" / "final")
    same_weights(model.state_dict(), sim.state.params)
    rows = run_rows(tmp_path / "fl")
    assert [r["round"] for r in rows] == [0, 1, 2] and "eval_loss" not in rows[1]
    for a, b in zip(rows, sim.rows):
        assert a.get("client_ids") == b.get("client_ids")
        assert a.get("train_loss") == b.get("train_loss")
        assert ("eval_loss" in a) == ("eval_loss" in b)
        assert a.get("eval_loss", 0) == pytest.approx(b.get("eval_loss", 0), rel=1e-6)
    log = (tmp_path / "fl" / server_app.LOG_FILE).read_text()
    assert "left out" in log and "CLIENT_X.txt:3: not valid UTF-8" in log
    assert "not valid UTF-8" in r.stdout  # the ServerApp's log, streamed by flwr run
    print(f"2 rounds + 2 evaluations over Flower: {took:.1f} s")


@pytest.mark.slow
def test_a_supernode_killed_in_round_2_is_dropped_and_named(data, tmp_path, federation):
    fed = federation()
    for i, d in enumerate(data.nodes):
        fed.node(f"node{i}", d)
    out = tmp_path / "fl"
    given = [x for k, v in TINY.items() for x in (f"--{k}", v)]
    proc = fed.cli_async("run", "--out", str(out), *given, "--on-client-error", "drop",
                         "--min-clients", "2", "--client-timeout", "40", "--eval-every", "0")
    try:
        wait_for_row(out, 1, proc)
        fed.kill("node1")  # the SuperNode, its SuperExec and any ClientApp: a dead machine
        stdout, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout[-3000:]
    rows = run_rows(out)
    assert rows[-1]["round"] == 2 and rows[-1]["clients"] == 2
    (lost,) = rows[-1]["dropped"]
    assert lost["client_id"] == "CLIENT_1"
    assert "(client CLIENT_1): no reply within 40 s" in lost["reason"]
    node_id = lost["reason"].split()[1]
    assert f"node {node_id} (client CLIENT_1) failed" in stdout
    assert (out / "final").is_dir()


@pytest.mark.slow
def test_with_supernode_auth_a_killed_server_app_resumes_exactly(data, tmp_path, federation):
    """SuperNodes authenticated by registered keys (an unregistered one is refused); the
    ServerApp killed after round 1; `fedtext flower run --resume` finishes round 2 with the
    weights of an uninterrupted simulation."""
    fed = federation(auth=True)
    keys = tmp_path / "keys"
    commands.make_keys(keys, ["n0", "n1", "n2", "stranger"])
    r = fed.cli("register", *(str(keys / f"n{i}.pub") for i in range(3)), timeout=120)
    assert r.returncode == 0, r.stdout
    for i, d in enumerate(data.nodes):
        fed.node(f"node{i}", d, "--auth-key", str(keys / f"n{i}"))
    stranger = fed.node("stranger", data.nodes[0], "--auth-key", str(keys / "stranger"))
    out, flags = tmp_path / "fl", ["--eval-every", "0"]
    r = fed.train(out, *flags, "--detach", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for_row(out, 1)
    server_pid = int((out / ".lock").read_text())  # the ServerApp holds the run's lock
    os.kill(server_pid, signal.SIGKILL)
    r = fed.train(out, *flags, "--resume")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "is gone" in r.stdout and "resuming" in r.stdout  # the dead run stopped first
    sim = simulate(data, tmp_path / "sim", **{"eval-every": "0"})
    from fedtext.model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(out / "final")
    same_weights(model.state_dict(), sim.state.params)
    assert [r["train_loss"] for r in run_rows(out)] == [r["train_loss"] for r in sim.rows]
    assert stranger.wait(30) != 0  # never let in
    assert "Failed to activate SuperNode" in fed.log("stranger")
