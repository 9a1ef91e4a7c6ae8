"""One-by-one vs batched clients: the time of one fed_avg round, the same clients either way.

    .venv/bin/python benchmarks/bench_batched.py                      # CPU, the three rounds
    .venv/bin/python benchmarks/bench_batched.py --device cuda        # on a GPU machine
    .venv/bin/python benchmarks/bench_batched.py --rounds 100 --group-sizes 16,32,100 --reps 3

Rounds (federated Shakespeare, batches of 8 x 100):
  tutorial   3 clients with 5 full batches each (drop_remainder, as the TFF tutorial), GRU 1024
             (Embedding 256), the tutorial's model
  30, 100    30 / 100 clients drawn uniformly (as `fedtext train` samples: most are small, a
             median client has 2 batches), up to 5 padded batches each, GRU 256 (Embedding 64)

Modes:
  one-by-one  SequentialBackend: client_update per client (on a CPU the C kernel, on a GPU
              torch's cuDNN GRU)
  batched     BatchedBackend(group_size): G clients per grouped training loop (fedtext.fl.batched)

Each (round, mode) runs a warm-up round, then --reps timed rounds, each from the same initial
params on a fresh cohort (the same cohorts in both modes); the table has the median. "update
diff" is max |params_batched - params_one_by_one| / max |params_one_by_one - params_0| after
the same round: how far apart the two modes' rounds are, relative to the round's update.
TF32 is off on a GPU (torch's cuDNN default allows it, which would make one-by-one fp32 GRUs
less exact than the batched ones); --tf32 leaves torch's defaults.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

from fedtext.backends.base import SequentialBackend
from fedtext.backends.batched import BatchedBackend
from fedtext.data.store import load_shakespeare
from fedtext.data.tasks import ClientData, DataConfig
from fedtext.fl.algorithm import fed_avg
from fedtext.fl.client import ClientConfig
from fedtext.model.char_rnn import CharRNN, ModelConfig

ROUNDS = {  # name -> (clients, hidden, embed, cohort)
    "tutorial": (3, 1024, 256, "large"),
    "30": (30, 256, 64, "uniform"),
    "100": (100, 256, 64, "uniform"),
}


def cohorts(n_clients: int, kind: str, count: int, seed: int = 0) -> list[list]:
    """`count` cohorts of n_clients (client id, ClientData), drawn without replacement."""
    ds = load_shakespeare()
    sizes = ds.train.chars_per_client
    need = 5 * 8 * 101 if kind == "large" else 2
    ok = [ds.train.client_ids[i] for i in np.flatnonzero(sizes >= need)]
    data_cfg = DataConfig(drop_remainder=kind == "large")
    rng = np.random.default_rng(seed)
    return [[(c, ClientData("shakespeare", c, data_cfg, 5))
             for c in rng.choice(ok, size=n_clients, replace=False)] for _ in range(count)]


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_rounds(backend, mc: ModelConfig, device: str, rounds: list[list]) -> dict:
    """Warm up on rounds[0], time the others from the same start; their params and stats."""
    torch.manual_seed(0)
    params = {k: v.detach().to(device) for k, v in CharRNN(mc).state_dict().items()}
    algorithm = fed_avg(ClientConfig(model=mc, max_batches=5, device=device), backend=backend)
    start = algorithm.init(params)
    algorithm.apply(start, rounds[0])  # warm-up: kernel built, model cached, cuDNN plans
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, finals, batches = [], [], []
    for cohort in rounds[1:]:
        sync(device)
        t0 = time.perf_counter()
        state, metrics = algorithm.apply(start, cohort)
        sync(device)
        times.append(time.perf_counter() - t0)
        finals.append(state.params)
        batches.append(metrics["num_batches"])
    peak = (torch.cuda.max_memory_allocated() / 2**20
            if torch.device(device).type == "cuda" else float("nan"))
    return {"round_s": statistics.median(times), "finals": finals, "start": start.params,
            "batches": statistics.median(batches), "peak_mib": peak}


def update_diff(base: dict, other: dict) -> float:
    worst = 0.0
    for p_base, p_other in zip(base["finals"], other["finals"]):
        upd = max((p_base[k] - base["start"][k]).abs().max().item() for k in p_base)
        err = max((p_other[k] - p_base[k]).abs().max().item() for k in p_base)
        worst = max(worst, err / upd)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--rounds", default="tutorial,30,100", help="which rounds (default all)")
    ap.add_argument("--group-sizes", help="batched group sizes (default 32 on a CPU, 32,100 "
                    "on a GPU)")
    ap.add_argument("--reps", type=int, default=2, help="timed rounds per mode (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--tf32", action="store_true", help="leave torch's TF32 defaults on a GPU")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    device = args.device
    group_sizes = args.group_sizes or ("32,100" if torch.device(device).type == "cuda" else "32")
    if torch.device(device).type == "cuda":
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    else:
        print(f"# CPU, {args.threads} threads, torch {torch.__version__}")
    rows = []
    for name in args.rounds.split(","):
        n, hidden, embed, kind = ROUNDS[name]
        mc = ModelConfig(embed_dim=embed, hidden_size=hidden)
        rounds = cohorts(n, kind, args.reps + 1)
        base = time_rounds(SequentialBackend(args.threads), mc, device, rounds)
        rows.append((name, hidden, n, base["batches"], "one-by-one", base, 0.0))
        print(f"{name}: one-by-one {base['round_s']:.2f} s", flush=True)
        for G in map(int, group_sizes.split(",")):
            r = time_rounds(BatchedBackend(G, threads=args.threads), mc, device, rounds)
            rows.append((name, hidden, n, base["batches"], f"batched G={G}", r,
                         update_diff(base, r)))
            print(f"{name}: batched G={G} {r['round_s']:.2f} s", flush=True)
    print(f"\n| round | model | clients | batches | mode | round s ({device}) | vs one-by-one "
          "| update diff | peak MiB (GPU) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, hidden, n, nb, mode, r, diff in rows:
        base = next(x[5] for x in rows if x[0] == name and x[4] == "one-by-one")
        print(f"| {name} | GRU {hidden} | {n} | {nb:.0f} | {mode} | {r['round_s']:.2f} | "
              f"{base['round_s'] / r['round_s']:.2f}x | {diff:.1e} | "
              f"{'-' if math.isnan(r['peak_mib']) else round(r['peak_mib'])} |")


if __name__ == "__main__":
    main()
