"""`fedtext train`: federated training from the command line.

    fedtext train --out runs/tiny --config configs/tiny.toml          # seconds on a CPU
    fedtext train --out runs/fedadam --server-optimizer adam --server-lr 0.01 --rounds 50
    fedtext train --out runs/fedadam --resume --rounds 100            # carry on, bit for bit

Every config field is a flag (`[client] lr` <-> `--client-lr`) and a key of the --config TOML
file; flags override the file, the file overrides the defaults.
"""

from __future__ import annotations

import shlex
import sys

from fedtext.cli.flags import add_config_flags, add_run_flags, config_sources
from fedtext.config import ExperimentConfig, merge


def register(sub) -> None:
    p = sub.add_parser("train", help="federated training (FedAvg, FedAvgM, FedAdam, ...)",
                       description="Federated training of a char-RNN: sample clients, train "
                       "them locally, aggregate, step the server; evaluate on held-out test "
                       "clients; checkpoint every round (exact --resume).")
    p.add_argument("--out", required=True, help="run directory: config.toml, metrics.jsonl, "
                   "tb/, state.pt, final/ (a checkpoint for `fedtext generate --model`)")
    add_config_flags(p, ExperimentConfig())
    add_run_flags(p)
    p.set_defaults(func=train_cmd)


def train_cmd(args) -> int:
    from fedtext.run.recorder import FINAL_DIR
    from fedtext.run.train import train

    sources = config_sources(args)
    cfg = merge(ExperimentConfig(), *sources)
    command = shlex.join(["fedtext", *getattr(args, "argv", sys.argv[1:])])
    result = train(cfg, args.out, resume=args.resume, sources=sources,
                   cache_dir=args.cache_dir, progress=not args.no_progress,
                   tensorboard=not args.no_tensorboard, command=command)
    done = f"{result.state.round} rounds done; run in {result.out}"
    if result.state.round >= cfg.run.rounds or args.resume:
        done += (f" (model: {result.out / FINAL_DIR}; `fedtext plot {result.out}` draws the "
                 "curves)")
    print(done)
    return 0
