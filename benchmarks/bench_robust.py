"""Robust aggregation under attack, and compressed uploads, on federated Shakespeare.

    .venv/bin/python benchmarks/bench_robust.py --out /tmp/bench-robust      # both tables
    .venv/bin/python benchmarks/bench_robust.py --only compression --rounds 3

Every run starts from the shipped pre-trained model (the tutorial's GRU 1024), samples 10
clients a round (seed 0: the same clients in every run), trains each on up to 5 batches of
8 x 100 with client SGD 0.5, and is evaluated before the first round and after the last on
the tutorial's fixed sample of 96 held-out test clients (~97k characters).

Attacks (fedtext/fl/attacks.py; attackers drawn per round by the seed): none, 20% sign-flip,
20% scale x10, 10% NaN, 20% gaussian (noise of 10x the norm of a median honest update: S =
10 C / sqrt(parameters) per coordinate), and 20% sign-flip x10 (scale:-10: in expectation
the plain mean is then 0.8 - 0.2 x 10 = -1.2 times the honest mean, a step backwards). A
fraction means each sampled client is an attacker with that probability. Aggregators: mean,
median, trimmed mean (beta 0.2), Krum (f = 2), norm bound (C = the median honest update norm
of a clean first round), geometric median.

Compression: float32, 8, 4 and 2 bits (stochastic quantization with a random Hadamard
rotation), with the mean and no attack: held-out accuracy and the bytes uploaded per round.
Each run is a plain `fedtext.train` call; its run directory keeps config.toml and
metrics.jsonl, so every figure can be re-drawn from them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ATTACKS = [("none", {}), ("sign-flip 20%", {"attack": "sign-flip", "attackers": "0.2"}),
           ("scale x10 20%", {"attack": "scale:10", "attackers": "0.2"}),
           ("NaN 10%", {"attack": "nan", "attackers": "0.1"}),
           ("gaussian 20%", {"attack": "gaussian:{S}", "attackers": "0.2"}),
           ("sign-flip x10 20%", {"attack": "scale:-10", "attackers": "0.2"})]
AGGREGATORS = [("mean", {"aggregator": "mean"}), ("median", {"aggregator": "median"}),
               ("trimmed mean", {"aggregator": "trimmed-mean", "trim-fraction": "0.2"}),
               ("Krum", {"aggregator": "krum", "krum-f": "2"}),
               ("norm bound", {"aggregator": "norm-bound"}),
               ("geometric median", {"aggregator": "geometric-median"})]
COMPRESSION = [("float32", {}), ("8 bits", {"compression": "8", "compression-rotation": True}),
               ("4 bits", {"compression": "4", "compression-rotation": True}),
               ("2 bits", {"compression": "2", "compression-rotation": True})]


def base_flags(rounds: int) -> dict:
    return {"model": "pretrained", "rounds": str(rounds), "clients-per-round": "10",
            "max-batches": "5", "eval-every": str(rounds), "eval-clients": "96", "seed": "0"}


def run(out: Path, flags: dict) -> dict:
    from fedtext.config import FLAGS, ExperimentConfig, merge
    from fedtext.run.train import train

    cfg = merge(ExperimentConfig(), (FLAGS, flags))
    if (out / "final").exists():  # done before: re-read, don't re-run
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    else:
        resume = (out / "state.pt").exists()
        rows = train(cfg, out, resume=resume, progress=False, tensorboard=False,
                     log=lambda s: None).rows
    first = next(r for r in rows if r.get("eval_accuracy") is not None)
    last = rows[-1]
    trained = [r for r in rows if r.get("clients")]
    return {"acc0": first["eval_accuracy"], "acc": last["eval_accuracy"],
            "loss": last["eval_loss"], "seconds": sum(r["seconds"] for r in trained),
            "upload": sum(r.get("upload_bytes", 0) for r in trained) / len(trained),
            "upload_fp32": sum(r.get("upload_bytes_fp32", 0) for r in trained) / len(trained),
            "dropped": sum(len(r.get("dropped", [])) for r in trained)}


def honest_norm() -> tuple[float, int]:
    """(the median client update norm of the first clean round, parameters): the norm
    bound's C and the gaussian attack's scale."""
    import numpy as np

    from fedtext.data.store import load_shakespeare
    from fedtext.data.tasks import ClientData, DataConfig
    from fedtext.fl import params as P
    from fedtext.fl.client import ClientConfig, client_update
    from fedtext.fl.sampling import UniformSampler, client_seed
    from fedtext.model.checkpoint import load_checkpoint, resolve_model_spec

    model, _ = load_checkpoint(resolve_model_spec("pretrained"))
    ds = load_shakespeare()
    ids = UniformSampler(ds.train.client_ids, 10, 0).sample(0)
    cfg = ClientConfig(model=model.config, max_batches=5)
    params = {k: v.detach() for k, v in model.state_dict().items()}
    norms = [P.global_norm(client_update(params, ClientData("shakespeare", c, DataConfig()),
                                         cfg, client_seed(0, 0, i)).delta)
             for i, c in enumerate(ids)]
    return float(np.median(norms)), model.num_params()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/bench-robust", help="where the runs go")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per run (default 5)")
    ap.add_argument("--only", choices=("robust", "compression"), help="one table only")
    args = ap.parse_args()
    root = Path(args.out)
    t0 = time.time()
    if args.only != "compression":
        clip, n_params = honest_norm()
        sigma = 10 * clip / n_params ** 0.5
        print(f"norm bound C = {clip:.4f} (median client update norm, clean round 1); "
              f"gaussian attack S = {sigma:.3g}")
        table = {}
        for a_name, a_flags in ATTACKS:
            for g_name, g_flags in AGGREGATORS:
                flags = {**base_flags(args.rounds), **a_flags, **g_flags}
                if "attack" in flags:
                    flags["attack"] = flags["attack"].replace("{S}", f"{sigma:.4g}")
                if g_name == "norm bound":
                    flags["clip-norm"] = f"{clip:.6g}"
                key = f"{a_name}|{g_name}".replace(" ", "_").replace("%", "")
                r = run(root / key, flags)
                table[(a_name, g_name)] = r
                print(json.dumps({"attack": a_name, "aggregator": g_name, **r}), flush=True)
        print(f"\nheld-out accuracy after {args.rounds} rounds (round 0: "
              f"{next(iter(table.values()))['acc0']:.4f})\n")
        print("| attack | " + " | ".join(g for g, _ in AGGREGATORS) + " |")
        print("|---|" + "---|" * len(AGGREGATORS))
        for a_name, _ in ATTACKS:
            print(f"| {a_name} | " + " | ".join(f"{table[(a_name, g)]['acc']:.4f}"
                                              for g, _ in AGGREGATORS) + " |")
        print("\nseconds per round")
        print("| attack | " + " | ".join(g for g, _ in AGGREGATORS) + " |")
        print("|---|" + "---|" * len(AGGREGATORS))
        for a_name, _ in ATTACKS:
            print(f"| {a_name} | " + " | ".join(
                f"{table[(a_name, g)]['seconds'] / args.rounds:.1f}" for g, _ in AGGREGATORS)
                + " |")
    if args.only != "robust":
        print("\n| upload | held-out accuracy | bytes per round | vs float32 |")
        print("|---|---|---|---|")
        for c_name, c_flags in COMPRESSION:
            key = "compression_" + c_name.replace(" ", "_")
            r = run(root / key, {**base_flags(args.rounds), **c_flags})
            print(f"| {c_name} | {r['acc']:.4f} | {r['upload']:,.0f} | "
                  f"{r['upload'] / r['upload_fp32']:.3f} |", flush=True)
    print(f"\n{time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
