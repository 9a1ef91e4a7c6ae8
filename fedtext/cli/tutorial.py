"""`fedtext tutorial`: TFF's text generation tutorial, end to end (fedtext.run.tutorial)."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from fedtext.cli.flags import add_config_flags, add_run_flags, config_sources
from fedtext.config import merge
from fedtext.run.tutorial import GEN_LENGTH, PROMPT, SEED_CLIENTS, SEED_SETTINGS, TUTORIAL


def register(sub) -> None:
    p = sub.add_parser("tutorial", help="TFF's text generation tutorial, end to end",
                       description="Load the pre-trained model, generate, evaluate (Shakespeare "
                       "vs random text), fine-tune it with federated averaging, evaluate after "
                       "every round, generate again, and print a before/after table.")
    p.add_argument("--out", help="run directory (default runs/tutorial-<date>-<time>)")
    p.add_argument("--seed-settings", action="store_true", help="the seed's literal setup: "
                   f"the same 3 clients every round ({', '.join(SEED_CLIENTS)}), "
                   "drop_remainder, NUM_EXAMPLES weighting, eval on their test text")
    p.add_argument("--prompt", default=PROMPT, help=f"generation prompt (default {PROMPT!r})")
    p.add_argument("--length", type=int, default=GEN_LENGTH, help="characters to generate "
                   f"(default {GEN_LENGTH})")
    add_config_flags(p, TUTORIAL)
    add_run_flags(p)
    p.set_defaults(func=tutorial_cmd)


def tutorial_cmd(args) -> int:
    from fedtext.run.tutorial import run_tutorial

    sources = config_sources(args)
    if args.seed_settings:
        sources.insert(0, ("--seed-settings", SEED_SETTINGS))
    cfg = merge(TUTORIAL, *sources)
    out = Path(args.out or f"runs/tutorial-{time.strftime('%Y%m%d-%H%M%S')}")
    command = shlex.join(["fedtext", *getattr(args, "argv", ["tutorial"])])
    run_tutorial(cfg, out, sources=sources, resume=args.resume, prompt=args.prompt,
                 length=args.length, cache_dir=args.cache_dir, progress=not args.no_progress,
                 tensorboard=not args.no_tensorboard, command=command)
    return 0
