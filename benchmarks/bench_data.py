"""Federated Shakespeare data: cache build time, cache load time, batching throughput.

    .venv/bin/python benchmarks/bench_data.py               # build into a temp cache, measure
    .venv/bin/python benchmarks/bench_data.py --repeats 1 --no-model

Build: load_shakespeare(rebuild=True) into a fresh temporary cache directory (parse 38 plays,
split, pack, write). Load: load_shakespeare() on that cache (fingerprint the sources, read the
index, memory-map the arrays), warm page cache, in this process and in a fresh one.
Batching: client_batches over every train client, per mode, in batches per second; for scale,
one training step (forward, backward) of the tutorial's model on one batch, unless --no-model.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from fedtext.data.batching import client_batches
from fedtext.data.store import load_shakespeare


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


FRESH = """import time
from fedtext.data.store import load_shakespeare
t = time.perf_counter(); load_shakespeare({cache!r}); print(time.perf_counter() - t)"""


def fresh_process_load(cache: str) -> float:
    """load_shakespeare() as a new process sees it (imports excluded, page cache warm)."""
    code = FRESH.format(cache=cache)
    return float(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
    )


def batching(store, repeats: int, **kw) -> dict:
    """Batches/s over all clients of `store` (best of `repeats` passes: least disturbed)."""
    n_batches = 0

    def one_pass():
        nonlocal n_batches
        n_batches = sum(len(client_batches(store.chars(i), **kw)) for i in range(len(store)))

    best = min(timed(one_pass, repeats))
    return {
        "batches": n_batches,
        "seconds": round(best, 3),
        "batches_per_s": round(n_batches / best),
    }


def train_step_seconds(batch, repeats: int) -> float:
    from fedtext.model.char_rnn import CharRNN, ModelConfig

    model = CharRNN(ModelConfig())

    def step():
        _, loss = model(batch.x, batch.y, batch.mask)
        loss.backward()

    step()  # warm-up
    return statistics.median(timed(step, repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="repeats per measurement")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (shared machine: 1)")
    ap.add_argument("--no-model", action="store_true", help="skip the training-step comparison")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as cache:
        build = timed(lambda: load_shakespeare(cache, rebuild=True), args.repeats)
        load = timed(lambda: load_shakespeare(cache), 5 * args.repeats)
        fresh = [fresh_process_load(cache) for _ in range(args.repeats)]
        ds = load_shakespeare(cache)
        train = ds.train
        result = {
            "cpu": cpu_name(),
            "torch_threads": args.threads,
            "clients": len(train),
            "train_chars": train.total_chars,
            "build_s": {"median": round(statistics.median(build), 2), "min": round(min(build), 2)},
            "load_s": {"median": round(statistics.median(load), 4), "max": round(max(load), 4)},
            "load_fresh_process_s": round(statistics.median(fresh), 4),
            "batching": {
                "padded": batching(train, args.repeats),
                "padded_shuffled": batching(train, args.repeats, shuffle_seed=0),
                "drop_remainder": batching(train, args.repeats, mode="drop_remainder"),
            },
        }
        if not args.no_model:
            big = train.chars_per_client.argmax()
            batch = client_batches(train.chars(int(big)))[0]
            result["train_step_s"] = round(train_step_seconds(batch, args.repeats), 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
