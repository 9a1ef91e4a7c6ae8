"""`fedtext train`, `fedtext tutorial`, `fedtext plot`: federated training from the command line.

    fedtext train --out runs/tiny --config configs/tiny.toml          # seconds on a CPU
    fedtext train --out runs/fedadam --server-optimizer adam --server-lr 0.01 --rounds 50
    fedtext train --out runs/fedadam --resume --rounds 100            # carry on, bit for bit
    fedtext tutorial                                                  # TFF's tutorial, end to end
    fedtext plot runs/fedadam                                         # loss and accuracy PNGs

Every TrainConfig field is a flag (`client_lr` <-> `--client-lr`) and a key of the --config
TOML file; flags override the file, the file overrides the defaults.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import fields

from fedtext.config import FLAGS, TrainConfig
from fedtext.errors import FedtextError

D = TrainConfig()

# Field -> help. The flag is --field-name; the type comes from the field.
HELP = {
    "model": "'pretrained' (the shipped model), 'scratch' (a new one: see --hidden-size ...), "
             "a checkpoint directory, or a run directory (its final model)",
    "data": "'shakespeare' (federated Shakespeare), or your own data: a directory of "
            "<client>.txt files or a .jsonl file",
    "rounds": "rounds of federated training",
    "clients_per_round": "clients sampled at random each round",
    "clients": "comma-separated train client ids to use every round instead of sampling",
    "sampling": "how clients are drawn: uniform, or weighted by their characters",
    "weighting": "client weight in the average: tokens (counted chars), examples (TFF's "
                 "NUM_EXAMPLES) or uniform",
    "local_epochs": "passes over a client's batches per round",
    "max_batches": "batches per client and epoch (the tutorial's .take(5)); 0 = all",
    "batch_size": "sequences per batch",
    "seq_len": "characters per sequence",
    "client_optimizer": "the clients' optimizer (fresh each round, as in TFF)",
    "client_lr": "client learning rate",
    "client_momentum": "client SGD momentum",
    "prox_mu": "FedProx proximal term mu (0 = FedAvg)",
    "server_optimizer": "server optimizer on the mean delta: sgd (lr 1 = FedAvg), sgdm "
                        "(FedAvgM), adam, yogi, adagrad (Reddi et al. 2021)",
    "server_lr": "server learning rate (eta)",
    "server_momentum": "server momentum for sgd/sgdm (-1 = default: 0.9 for sgdm, else 0)",
    "server_b1": "adam/yogi beta_1",
    "server_b2": "adam/yogi beta_2",
    "server_eps": "adam/yogi/adagrad epsilon (tau) (-1 = TFF's default per optimizer)",
    "clip_norm": "clip every client delta to this L2 norm first (0 = no clipping)",
    "eval_every": "evaluate on held-out test clients every N rounds (and after the last)",
    "eval_clients": "evaluate on a fixed seeded sample of N test clients (0 = all of them)",
    "eval_client_ids": "comma-separated test client ids to evaluate on instead",
    "seed": "seed of client sampling, shuffling, the eval sample and a scratch model",
    "precision": "bf16: the GRU's recurrent matmuls in bfloat16 (faster, not exact)",
    "embed_dim": "embedding size (--model scratch)",
    "hidden_size": "recurrent units (--model scratch)",
    "num_layers": "recurrent layers (--model scratch)",
    "cell": "recurrent cell (--model scratch)",
}
CHOICES = {"sampling": ("uniform", "weighted"), "weighting": ("tokens", "examples", "uniform"),
           "client_optimizer": ("sgd", "adam", "adagrad"),
           "server_optimizer": ("sgd", "sgdm", "adam", "yogi", "adagrad"),
           "precision": ("fp32", "bf16"), "cell": ("gru", "lstm")}


METAVAR = {"model": "pretrained|scratch|CKPT", "data": "shakespeare|PATH", "rounds": "N",
           "clients_per_round": "K", "clients": "ID,...", "eval_client_ids": "ID,...",
           "local_epochs": "E", "max_batches": "B", "eval_every": "N", "eval_clients": "N",
           "seed": "S"}


def add_config_flags(p: argparse.ArgumentParser, defaults: TrainConfig = D) -> None:
    """One flag per TrainConfig field; all default to None, so only given flags override.

    Values stay strings here and are converted by `config_sources`, so a bad value is one
    FedtextError line naming the flag (argparse would print its usage block instead).
    """
    p.add_argument("--config", metavar="FILE.toml", help="TOML file of settings (keys are the "
                   "flag names with underscores); flags override it")
    for f in fields(TrainConfig):
        default = getattr(defaults, f.name)
        if f.name == "drop_remainder":
            g = p.add_mutually_exclusive_group()
            g.add_argument("--padding", dest="drop_remainder", action="store_false",
                           default=None, help="pad and mask short clients' last batch "
                           f"(default{'' if not default else ': off'})")
            g.add_argument("--drop-remainder", dest="drop_remainder", action="store_true",
                           default=None, help="only full batches, as the tutorial (clients "
                           "under batch*(seq+1) chars have none)")
            continue
        if f.name == "shuffle":
            p.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=None,
                           help=f"shuffle a client's sequences each epoch (default {default})")
            continue
        shown = ",".join(default) if isinstance(default, tuple) else default
        metavar = ("{" + ",".join(CHOICES[f.name]) + "}" if f.name in CHOICES
                   else METAVAR.get(f.name, f.name.split("_")[-1].upper()))
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                       metavar=metavar,
                       help=f"{HELP[f.name]} (default {shown if shown != '' else 'none'})")


def _flag_value(name: str, text: str):
    """A flag's string as the field's type, or one FedtextError line naming the flag."""
    want = type(getattr(D, name))
    if want in (int, float):
        try:
            return want(text)
        except ValueError:
            kind = "an integer" if want is int else "a number"
            raise FedtextError(f"--{name.replace('_', '-')} must be {kind}, not {text!r}") from None
    return text  # str, or "a,b,c" for the id lists (config splits it)


def config_sources(args) -> list[tuple[str, dict]]:
    """The (where, overrides) sources of the flags: --config FILE, then the flags."""
    from fedtext.config import load_toml

    sources = []
    if args.config:
        sources.append((args.config, load_toml(args.config)))
    flags = {}
    for f in fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            flags[f.name] = _flag_value(f.name, value) if isinstance(value, str) else value
    sources.append((FLAGS, flags))
    return sources


def add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue the run in --out (its "
                   "saved settings; only --rounds and --eval-every may change)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cache-dir", help="data cache (default $FEDTEXT_CACHE or ~/.cache/fedtext)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard events")


def register(sub) -> None:
    p = sub.add_parser("train", help="federated training (FedAvg, FedAvgM, FedAdam, ...)",
                       description="Federated training of a char-RNN: sample clients, train "
                       "them locally, average, step the server; evaluate on held-out test "
                       "clients; checkpoint every round (exact --resume).")
    p.add_argument("--out", required=True, help="run directory: config.toml, metrics.jsonl, "
                   "tb/, state.pt, final/ (a checkpoint for `fedtext generate --model`)")
    add_config_flags(p)
    add_run_flags(p)
    p.set_defaults(func=train_cmd)

    from fedtext.tutorial import register_tutorial

    register_tutorial(sub, add_config_flags, add_run_flags)

    p = sub.add_parser("plot", help="plot a run's loss and accuracy curves (PNG)",
                       description="Read RUN/metrics.jsonl and write loss.png and "
                       "accuracy.png (train and held-out eval per round).")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directory (several: compared "
                   "in one plot)")
    p.add_argument("--out", help="where to write the PNGs (default: the first RUN)")
    p.set_defaults(func=plot_cmd)


def set_threads(n: int | None) -> None:
    if n is not None:
        if n < 1:
            raise FedtextError(f"--threads must be >= 1, not {n}")
        import torch

        torch.set_num_threads(n)


def train_cmd(args) -> int:
    from fedtext.config import merge
    from fedtext.experiment import FINAL_DIR
    from fedtext.trainer import train

    sources = config_sources(args)
    cfg = merge(TrainConfig(), *sources)
    set_threads(args.threads)
    command = shlex.join(["fedtext", *getattr(args, "argv", sys.argv[1:])])
    result = train(cfg, args.out, resume=args.resume, overrides=sources,
                   cache_dir=args.cache_dir, progress=not args.no_progress,
                   tensorboard=not args.no_tensorboard, command=command)
    print(f"{result.state.round} rounds done; run in {result.out} (model: "
          f"{result.out / FINAL_DIR}; `fedtext plot {result.out}` draws the curves)")
    return 0


def plot_cmd(args) -> int:
    from fedtext.plot import plot_runs

    for path in plot_runs(args.runs, args.out):
        print(path)
    return 0
