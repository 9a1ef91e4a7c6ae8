"""A tutorial-size round over Flower on loopback vs in process: what the transport costs.

    .venv/bin/python benchmarks/bench_flower.py                     # the table of BENCHMARKS.md
    .venv/bin/python benchmarks/bench_flower.py --rounds 2 --model scratch --hidden 64

The workload is the tutorial's: 3 federated Shakespeare clients with 5 full batches of 8 x 100
each (the same fixed cohort every round, `--clients`), the pre-trained GRU 1024 (4,051,032
parameters, 16.2 MB), client SGD 0.5, FedAvg, evaluation off. Both runs use the same config
and seeds, and the script checks that they end with the same weights.

  in process   `fedtext train` (sequential backend): the 3 clients one after the other
  over Flower  a SuperLink (TLS) and 3 SuperNodes on loopback, one per client (data
               shakespeare + its client id), started with `fedtext flower`; then
               `fedtext flower run` of the same config

Per round: the round's seconds (metrics.jsonl train_seconds; the median over rounds 2..R in
process, where round 1 also pays one-off imports, and over all rounds over Flower, where every
round pays them); where a Flower round's time goes, from the ServerApp's log (backend.py
times each reply; the node reports when its handler started, against the message's creation
time, and how long it ran); the bytes through the SuperLink (`flwr ls` network traffic,
whole run / rounds: the nodes' Fleet traffic, instructions down and replies up); and the
model's bytes as Flower counts them (ArrayRecord.count_bytes). Prints a Markdown table and
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cohort(n: int, batches: int) -> list[str]:
    """n clients with `batches` full batches of 8 x 100 (the tutorial's drop_remainder)."""
    from fedtext.data.tasks import open_dataset

    train = open_dataset("shakespeare").train  # builds the cache once, before the nodes start
    big = [c for c in train.client_ids if train.num_chars(c) >= batches * 8 * 101]
    return big[:n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds of each run (default 3)")
    p.add_argument("--clients", type=int, default=3, help="clients = SuperNodes (default 3)")
    p.add_argument("--batches", type=int, default=5, help="batches per client (default 5)")
    p.add_argument("--model", default="pretrained", help="pretrained (GRU 1024) or scratch")
    p.add_argument("--hidden", type=int, default=1024, help="GRU width of a scratch model")
    p.add_argument("--threads", type=int, default=1, help="torch threads per client, in "
                   "process and on each node (default 1)")
    p.add_argument("--keep", help="keep runs and logs in this directory")
    args = p.parse_args()

    from fedtext.backends.flower import commands

    ids = cohort(args.clients, args.batches)
    flags = ["--model", args.model, "--rounds", str(args.rounds), "--clients", ",".join(ids),
             "--max-batches", str(args.batches),
             "--drop-remainder", "--eval-every", "0", "--threads", str(args.threads)]
    if args.model == "scratch":
        flags += ["--hidden-size", str(args.hidden)]
    root = Path(args.keep or tempfile.mkdtemp(prefix="bench-flower-"))
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **commands.QUIET}

    # In process.
    t0 = time.perf_counter()
    r = subprocess.run([str(BIN / "fedtext"), "train", "--out", str(root / "sim"), *flags,
                        "--no-progress", "--no-tensorboard"], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    sim_wall = time.perf_counter() - t0
    sim_rows = [json.loads(x) for x in (root / "sim" / "metrics.jsonl").read_text().split("\n")
                if x]

    # Over Flower.
    commands.make_certs(root / "certs")
    port, procs = free_port(), []
    logs = root / "logs"
    logs.mkdir(exist_ok=True)

    def start(name, argv):
        procs.append(subprocess.Popen(
            [str(BIN / "fedtext"), "flower", *argv, "--flwr-home", str(root / "home" / name)],
            stdout=open(logs / f"{name}.log", "w"), stderr=subprocess.STDOUT, env=env,
            start_new_session=True))

    try:
        start("superlink", ["superlink", "--certs", str(root / "certs"), "--port", str(port)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until its HTTPS port is up
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        for i, cid in enumerate(ids):
            start(f"node{i}", ["supernode", "--data", "shakespeare", "--client-id", cid,
                               "--superlink", f"127.0.0.1:{port}", "--ca",
                               str(root / "certs" / "ca.crt"), "--port", str(free_port())])
        t0 = time.perf_counter()
        r = subprocess.run([str(BIN / "fedtext"), "flower", "run", "--out", str(root / "fl"),
                            *flags, "--superlink", f"127.0.0.1:{port}", "--ca",
                            str(root / "certs" / "ca.crt"), "--flwr-home",
                            str(root / "home" / "cli")], env=env, capture_output=True,
                           text=True)
        fl_wall = time.perf_counter() - t0
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        run_id = re.search(r"Successfully started run (\d+)", r.stdout).group(1)
        ls = subprocess.run(commands.status_command(run_id), capture_output=True, text=True,
                            env={**env, "FLWR_HOME": str(root / "home" / "cli")})
        traffic = json.loads(ls.stdout)["runs"][0]["network-traffic"]
    finally:
        for q in procs:
            if q.poll() is None:
                os.killpg(q.pid, signal.SIGTERM)
        for q in procs:
            try:
                q.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(q.pid, signal.SIGKILL)
    fl_rows = [json.loads(x) for x in (root / "fl" / "metrics.jsonl").read_text().split("\n")
               if x]
    # The ServerApp's per-exchange breakdown (backend.py logs it for every round).
    timing = [[[float(x) for x in part.split(" / ")] for part in m] for m in re.findall(
        r"flower: train: \d+ replies after ([\d. /]+) s; the nodes started them "
        r"([\d. /]+) s after sending and worked ([\d. /]+) s", (root / "fl" / "flower.log")
        .read_text())]
    arrived = [max(t[0]) for t in timing]
    wait = [x for t in timing for x in t[1]]
    work = [x for t in timing for x in t[2]]
    back = [a - w - n for t in timing for a, w, n in zip(*t)]

    import torch

    from fedtext.backends.flower.messages import params_record
    from fedtext.model.checkpoint import load_checkpoint

    a, _ = load_checkpoint(root / "sim" / "final")
    b, _ = load_checkpoint(root / "fl" / "final")
    equal = all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    model_bytes = params_record(a.state_dict()).count_bytes()
    sim_s = statistics.median(x["train_seconds"] for x in sim_rows[1:] or sim_rows)
    fl_s = statistics.median(x["train_seconds"] for x in fl_rows)
    R = args.rounds
    per_round = {"in": traffic["inbound-bytes"] / R, "out": traffic["outbound-bytes"] / R}
    med = statistics.median
    res = {"clients": ids, "rounds": R, "batches": args.batches, "threads": args.threads,
           "model_bytes": model_bytes, "sim_round_s": [x["train_seconds"] for x in sim_rows],
           "flower_round_s": [x["train_seconds"] for x in fl_rows], "flower_timing": timing,
           "superlink_bytes_per_round": per_round, "sim_wall_s": sim_wall,
           "flower_wall_s": fl_wall, "same_weights": equal, "load_avg": os.getloadavg()}
    sim_min = min(x["train_seconds"] for x in sim_rows[1:] or sim_rows)
    fl_min = min(x["train_seconds"] for x in fl_rows)
    print(f"| per round | in process | over Flower (TLS, loopback) |\n|---|---|---|\n"
          f"| round, median (min), s | {sim_s:.2f} ({sim_min:.2f}) | {fl_s:.2f} ({fl_min:.2f}) "
          f"|\n| transport overhead, median (min), s | | {fl_s - sim_s:+.2f} "
          f"({fl_min - sim_min:+.2f}) |\n"
          f"| server sends -> node's handler starts (delivery, ClientApp process start), s "
          f"| | {med(wait):.2f} median ({min(wait):.1f}-{max(wait):.1f}) |\n"
          f"| in the handler (decoding, client_update), s | the clients one after the other "
          f"| {med(work):.2f} median per node, {len(ids)} at once |\n"
          f"| handler ends -> reply at the server, s | | {med(back):.2f} median |\n"
          f"| last reply, after sending, s | | {med(arrived):.2f} median |\n"
          f"| bytes through the SuperLink | 0 | {per_round['out']:,.0f} down + "
          f"{per_round['in']:,.0f} up |\n"
          f"| the model as Flower counts it (ArrayRecord) | {model_bytes:,} B | "
          f"x {len(ids)} down, x {len(ids)} up |\n"
          f"| whole run ({R} rounds), wall s | {sim_wall:.1f} | {fl_wall:.1f} |\n"
          f"| same final weights | | {equal} |")
    print(json.dumps(res))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
