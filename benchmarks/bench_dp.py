"""Differential privacy on federated Shakespeare: accuracy at a privacy budget, and its cost.

    .venv/bin/python benchmarks/bench_dp.py --out /tmp/bench-dp

The tutorial's pre-trained GRU 1024, Poisson sampling of K = 20 expected clients a round of
the 1,154, 10 rounds, up to 5 batches of 8 x 100 per client, client SGD 0.5, uniform
weighting (DP's), delta = 1e-5. For epsilon in (1, 4, 8, 16) the noise multiplier is
calibrated for the 10 rounds (RDP, `--dp-target-epsilon`); the clip is the median client
update norm of a clean first round (fixed clipping), and one run uses adaptive clipping
(Andrew et al., target quantile 0.5, from a clip 10x too small) to show the clip norm's
trajectory. No DP: the same run with the plain uniform mean. Held-out accuracy on the
tutorial's fixed sample of 96 test clients, before training and after round 10.

Why K = 20 and 10 rounds: a round of 20 clients of this model takes ~12 s of training on the
2 cores, so 6 runs fit in ~15 minutes. The cost of DP per round is the time of the DP
aggregation (clip, sum, noise for 4M parameters) next to the plain mean's, from the rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

EPSILONS = (1.0, 4.0, 8.0, 16.0)


def run(out: Path, flags: dict) -> list[dict]:
    from fedtext.config import FLAGS, ExperimentConfig, merge
    from fedtext.run.train import train

    if (out / "final").exists():
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    cfg = merge(ExperimentConfig(), (FLAGS, flags))
    return train(cfg, out, resume=(out / "state.pt").exists(), progress=False,
                 tensorboard=False, log=print).rows


def main() -> None:
    import bench_robust  # the same clean-round clip measurement

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/bench-dp")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=20, help="expected clients per round")
    args = ap.parse_args()
    root = Path(args.out)
    t0 = time.time()
    clip, _ = bench_robust.honest_norm()
    print(f"clip C = {clip:.4f} (median client update norm of a clean round)")
    base = {"model": "pretrained", "rounds": str(args.rounds),
            "clients-per-round": str(args.clients), "sampling": "poisson",
            "max-batches": "5", "weighting": "uniform", "eval-every": str(args.rounds),
            "eval-clients": "96", "seed": "0"}
    results = {"no DP": run(root / "nodp", base)}
    for eps in EPSILONS:
        results[f"epsilon {eps:g}"] = run(root / f"eps{eps:g}", {
            **base, "dp": "fixed", "dp-clip": f"{clip:.6g}", "dp-target-epsilon": f"{eps:g}",
            "dp-delta": "1e-5"})
    results["epsilon 8, adaptive clip"] = run(root / "adaptive", {
        **base, "dp": "adaptive", "dp-clip": f"{clip / 10:.6g}", "dp-target-epsilon": "8",
        "dp-delta": "1e-5", "dp-count-stddev": "1.0"})

    print(f"\n| run | noise multiplier | epsilon spent | held-out accuracy (round 0 -> "
          f"{args.rounds}) | loss | s per round |")
    print("|---|---|---|---|---|---|")
    for name, rows in results.items():
        evals = [r for r in rows if r.get("eval_accuracy") is not None]
        trained = [r for r in rows if r.get("clients") is not None and r["round"] > 0]
        z = rows[-1].get("dp_noise_multiplier")
        eps = rows[-1].get("epsilon")
        print(f"| {name} | {'-' if z is None else f'{z:.3f}'} | "
              f"{'-' if eps is None else f'{eps:.2f}'} | {evals[0]['eval_accuracy']:.4f} -> "
              f"{evals[-1]['eval_accuracy']:.4f} | {evals[-1]['eval_loss']:.3f} | "
              f"{sum(r['seconds'] for r in trained) / len(trained):.1f} |")
    adaptive = results["epsilon 8, adaptive clip"]
    print("\nadaptive clip norm per round: " + ", ".join(
        f"{r['dp_clip']:.4g}" for r in adaptive if "dp_clip" in r) +
        f" (the median honest norm: {clip:.4g})")
    print("\n" + aggregation_cost(args.clients))
    print(f"\n{time.time() - t0:.0f} s in all")


def aggregation_cost(k: int, reps: int = 5) -> str:
    """The server's cost of DP per round: aggregating k deltas of the tutorial model's size
    with the plain mean vs the DP Gaussian aggregator (clip, sum, noise), same process."""
    import statistics

    import torch

    from fedtext.fl.aggregators import mean
    from fedtext.fl.privacy import dp_gaussian
    from fedtext.model.checkpoint import load_checkpoint, resolve_model_spec

    model, _ = load_checkpoint(resolve_model_spec("pretrained"))
    g = torch.Generator().manual_seed(0)
    deltas = [{n: torch.randn(p.shape, generator=g) * 1e-3 for n, p in model.state_dict().items()}
              for _ in range(k)]
    times = {"mean": [], "dp fixed": [], "dp adaptive": []}
    aggs = {"mean": mean(), "dp fixed": dp_gaussian(1.0, k, 0.1),
            "dp adaptive": dp_gaussian(1.0, k, 0.1, adaptive=True, clipped_count_stddev=1.0)}
    for _ in range(reps):
        for name, agg in aggs.items():
            t = time.perf_counter()
            agg.aggregate([(d, 1.0) for d in deltas], agg.init(deltas[0]))
            times[name].append(time.perf_counter() - t)
    med = {n: statistics.median(v) for n, v in times.items()}
    return (f"aggregating {k} deltas of {model.num_params():,} parameters (median of {reps}): "
            + ", ".join(f"{n} {v * 1000:.0f} ms" for n, v in med.items()))


if __name__ == "__main__":
    main()
