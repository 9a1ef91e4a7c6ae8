"""Where clients train: sequential vs worker processes vs Ray, one round each, same clients.

    .venv/bin/python benchmarks/bench_backends.py                    # the table of BENCHMARKS.md
    .venv/bin/python benchmarks/bench_backends.py --models 256 --clients 10 --reps 1
    .venv/bin/python benchmarks/bench_backends.py --models 256 --impl torch  # another path

For each model (GRU 1024, the tutorial's; GRU 256, where thread scaling is worst) and cohort
(10 and 30 federated Shakespeare clients, up to 5 batches of 8 x 100 each, padded), one
process per configuration (so peak memory is its own). The cohort is drawn as `fedtext train`
draws it (`--cohort uniform`: any client, most of them small: a median client has 2 batches),
or from the clients with 5 full batches (`--cohort large`: the tutorial's workload):

  sequential   every client in this process, 2 torch threads
  processes    2 worker processes x 1 thread (fedtext.backends.processes)
  ray          2 Ray actors x 1 thread on a local Ray (fedtext.backends.ray)

A configuration runs a warm-up round, then --reps timed rounds of fed_avg (client work,
streaming aggregation, server step) and reports the median round time and the peak RSS of
the whole process tree (main + workers + Ray's own processes, from /proc VmHWM/VmRSS).
`--impl` picks the recurrence path of every backend alike (default auto: the C kernel, whose
time loops split over threads well; `torch`, the pure-PyTorch fallback, and `nn` scale worse,
which is where worker processes pay most). Then the per-client overhead of each backend: the
round time of 40 jobs that do nothing but receive the round's params and return a delta of
the same size, per job, in ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CLIENT_IDS_SEED = 0


def tree_peak_mib(root: int) -> float:
    """Sum of VmHWM over `root` and every descendant still alive (MiB)."""
    def children(pid):
        try:
            out = subprocess.run(["ps", "--ppid", str(pid), "-o", "pid="], capture_output=True,
                                 text=True).stdout.split()
        except OSError:
            return []
        return [int(p) for p in out]

    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            pass
        todo += children(pid)
    return total / 1024


def noop_update(global_params, client_data, config, seed):
    """A job with no training: receives the round's params, returns a delta of their size."""
    from fedtext.fl.client import ClientResult

    del client_data, config, seed
    delta = {k: v.clone() for k, v in global_params.items()}
    metrics = {"loss_sum": 1.0, "correct": 0, "count": 1, "num_examples": 1, "num_batches": 1,
               "batch_loss_sum": 1.0}
    return ClientResult(delta, 1.0, metrics)


def one_config(backend_name: str, hidden: int, clients: int, reps: int, cohort_kind: str,
               impl: str = "auto") -> dict:
    import numpy as np
    import torch

    from fedtext.backends.base import SequentialBackend
    from fedtext.data.store import load_shakespeare
    from fedtext.data.tasks import ClientData, DataConfig
    from fedtext.fl.algorithm import fed_avg
    from fedtext.fl.client import ClientConfig
    from fedtext.model.char_rnn import CharRNN, Compute, ModelConfig

    if backend_name == "sequential":
        torch.set_num_threads(2)
        backend = SequentialBackend(threads=2)
    elif backend_name == "processes":
        from fedtext.backends.processes import ProcessBackend

        backend = ProcessBackend(workers=2, threads=1)
    else:
        import tempfile

        from fedtext.backends.ray import RayBackend

        backend = RayBackend(workers=2, threads=1, num_cpus=2, object_store_memory=1 << 30,
                             _temp_dir=tempfile.mkdtemp(prefix="rb", dir="/tmp"))
    ds = load_shakespeare()
    sizes = ds.train.chars_per_client
    need = 5 * 8 * 101 if cohort_kind == "large" else 2
    ok = [ds.train.client_ids[i] for i in np.flatnonzero(sizes >= need)]
    rng = np.random.default_rng(CLIENT_IDS_SEED)
    mc = ModelConfig(embed_dim=256 if hidden == 1024 else 64, hidden_size=hidden)
    torch.manual_seed(0)
    params = {k: v.detach() for k, v in CharRNN(mc).state_dict().items()}
    data_cfg = DataConfig(shuffle=False)
    algorithm = fed_avg(ClientConfig(model=mc, max_batches=5, compute=Compute(impl=impl)),
                        backend=backend)
    state = algorithm.init(params)

    def cohort():
        return [(c, ClientData("shakespeare", c, data_cfg, 5))
                for c in rng.choice(ok, size=clients, replace=False)]

    algorithm.apply(state, cohort())  # warm-up: workers up, models built, kernel loaded
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        state, _ = algorithm.apply(state, cohort())
        times.append(time.perf_counter() - t0)
    # Per-client overhead: 40 jobs that only move params in and a delta out.
    noop = fed_avg(ClientConfig(model=mc), backend=backend, client_fn=noop_update)
    s2 = noop.init(params)
    noop.apply(s2, [(str(i), None) for i in range(4)])
    t0 = time.perf_counter()
    noop.apply(s2, [(str(i), None) for i in range(40)])
    overhead_ms = (time.perf_counter() - t0) / 40 * 1000
    peak = tree_peak_mib(os.getpid())
    backend.close()
    return {"backend": backend_name, "hidden": hidden, "clients": clients, "cohort": cohort_kind,
            "impl": impl,
            "round_s": statistics.median(times), "peak_mib": peak,
            "overhead_ms_per_client": overhead_ms,
            "params_mib": sum(v.numel() * 4 for v in params.values()) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="1024,256", help="GRU sizes (default 1024,256)")
    ap.add_argument("--clients", default="10,30", help="cohort sizes (default 10,30)")
    ap.add_argument("--backends", default="sequential,processes,ray")
    ap.add_argument("--reps", type=int, default=2, help="timed rounds per config (default 2)")
    ap.add_argument("--cohort", default="uniform,large", help="uniform (as `fedtext train` "
                    "samples) and/or large (5 full batches each); default both")
    ap.add_argument("--impl", default="auto", help="recurrence path (default auto: the C kernel "
                    "where it runs; torch or nn to see a path whose threads scale worse)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config, print JSON
    args = ap.parse_args()
    if args.one:
        b, h, k, c = args.one.split(",")
        print(json.dumps(one_config(b, int(h), int(k), args.reps, c, args.impl)))
        return
    rows = []
    for c in args.cohort.split(","):
        for h in map(int, args.models.split(",")):
            for k in map(int, args.clients.split(",")):
                for b in args.backends.split(","):
                    out = subprocess.run([sys.executable, __file__, "--one", f"{b},{h},{k},{c}",
                                          "--reps", str(args.reps), "--impl", args.impl],
                                         capture_output=True,
                                         text=True)
                    if out.returncode != 0:
                        print(out.stderr[-2000:], file=sys.stderr)
                        continue
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    print(f"\nrecurrence path: {args.impl}")
    print("\n| cohort | model | clients | backend | round s | vs sequential | peak MiB (all "
          "processes) | overhead ms/client |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(x for x in rows if x["hidden"] == r["hidden"] and x["cohort"] == r[
            "cohort"] and x["clients"] == r["clients"] and x["backend"] == "sequential")
        print(f"| {r['cohort']} | GRU {r['hidden']} | {r['clients']} | {r['backend']} | "
              f"{r['round_s']:.2f} | {base['round_s'] / r['round_s']:.2f}x | "
              f"{r['peak_mib']:.0f} | {r['overhead_ms_per_client']:.1f} |")


if __name__ == "__main__":
    main()
