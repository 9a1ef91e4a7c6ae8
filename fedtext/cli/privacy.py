"""`fedtext privacy`: the epsilon of a DP-FedAvg plan, or its noise, without training.

    fedtext privacy --noise-multiplier 1.0 --clients-per-round 20 --rounds 100
    fedtext privacy --target-epsilon 4 --clients-per-round 20 --rounds 100 --sampling uniform
"""

from __future__ import annotations

import json
import math

from fedtext.errors import FedtextError


def register(sub) -> None:
    p = sub.add_parser("privacy", help="epsilon of a DP-FedAvg plan (or the noise for a "
                       "target epsilon), without training",
                       description="User-level DP accounting with dp-accounting (fedtext.fl."
                       "accounting): give --noise-multiplier for its epsilon, or "
                       "--target-epsilon for the noise multiplier that spends it.")
    p.add_argument("--noise-multiplier", type=float, help="z (noise std = z x clip)")
    p.add_argument("--target-epsilon", type=float, help="calibrate z for this epsilon")
    p.add_argument("--clients-per-round", type=int, required=True,
                   help="K (the expected number with poisson sampling)")
    p.add_argument("--population", type=int, help="clients to sample from (default: federated "
                   "Shakespeare's 1,154 train clients)")
    p.add_argument("--rounds", type=int, required=True, help="rounds of training")
    p.add_argument("--delta", type=float, default=1e-5, help="delta (default 1e-5)")
    p.add_argument("--sampling", choices=("poisson", "uniform"), default="poisson",
                   help="poisson: each client with probability K/N (default); uniform: "
                   "exactly K without replacement")
    p.add_argument("--accountant", choices=("rdp", "pld"), default="rdp",
                   help="Renyi DP (default) or privacy loss distributions (Poisson only)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.epilog = ("poisson sampling is what the guarantee is usually stated for (TFF, Andrew et "
                "al.); uniform sampling's replace-one bound is stricter and much larger")
    p.set_defaults(func=privacy_cmd)


def privacy_cmd(args) -> int:
    from fedtext.fl import accounting

    if (args.noise_multiplier is None) == (args.target_epsilon is None):
        raise FedtextError("give --noise-multiplier (for its epsilon) or --target-epsilon "
                           "(for the noise), one of them")
    if args.noise_multiplier is not None and not args.noise_multiplier >= 0:
        raise FedtextError(f"--noise-multiplier must be >= 0, not {args.noise_multiplier}")
    if args.target_epsilon is not None and not args.target_epsilon > 0:
        raise FedtextError(f"--target-epsilon must be > 0, not {args.target_epsilon}")
    if args.rounds < 1:
        raise FedtextError(f"--rounds must be >= 1, not {args.rounds}")
    population = args.population
    if population is None:
        from fedtext.data.store import load_shakespeare

        population = len(load_shakespeare().train)
    if population < 1:
        raise FedtextError(f"--population must be >= 1, not {population}")
    if not 1 <= args.clients_per_round <= population:
        raise FedtextError(f"--clients-per-round must be in [1, {population}] (q = K / N in "
                           f"(0, 1]), not {args.clients_per_round}")
    if not 0 < args.delta < 1:
        raise FedtextError(f"--delta must be in (0, 1), not {args.delta}")
    accounting.check_delta(args.delta, population, "--delta")
    accounting.make_accountant(args.sampling, args.accountant)
    k, n = args.clients_per_round, population
    if args.noise_multiplier is not None:
        z = args.noise_multiplier
        eps = accounting.epsilon(z, args.rounds, args.delta, args.sampling, n, k,
                                 args.accountant)
    else:
        z = accounting.calibrate(args.target_epsilon, args.rounds, args.delta, args.sampling,
                                 n, k, args.accountant)
        eps = accounting.epsilon(z, args.rounds, args.delta, args.sampling, n, k,
                                 args.accountant)
    out = {"noise_multiplier": z, "epsilon": None if math.isinf(eps) else eps,
           "delta": args.delta, "rounds": args.rounds, "clients_per_round": k,
           "population": n, "q": k / n, "sampling": args.sampling,
           "accountant": args.accountant}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.sampling} sampling of {k} of {n} clients (q = {k / n:.4g}), "
              f"{args.rounds} rounds, noise multiplier {z:.4g}: epsilon {eps:.4g} at delta "
              f"{args.delta:g} ({args.accountant.upper()})")
    return 0
