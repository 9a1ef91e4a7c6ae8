"""`fedtext pretrain`, `fedtext evaluate`, `fedtext generate`: central training and model use.

    fedtext pretrain --out runs/kjv --steps 5000            # the King James Bible
    fedtext pretrain --out runs/kjv --resume                # carry on, bit for bit
    fedtext evaluate --model runs/kjv/model                 # federated Shakespeare test split
    fedtext evaluate --model pretrained --random            # accuracy ~ 1/86
    fedtext generate --model pretrained --prompt 'ROMEO:' --seed 0
"""

from __future__ import annotations

import json
import math
import secrets
import shlex
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch

from fedtext.errors import FedtextError
from fedtext.model import ModelConfig
from fedtext.pretrain import KJV, MODEL_DIR, STATE_FILE, PretrainConfig

P, M = PretrainConfig(), ModelConfig()


def register(sub) -> None:
    # --- pretrain: flags left out take the defaults, or on --resume the run's own settings.
    p = sub.add_parser("pretrain", help="train a model centrally on a text corpus (KJV default)",
                       description="Central pre-training (Adam, clipping, warmup + decay) with "
                       "periodic checkpoints into --out and exact --resume.")
    p.add_argument("--out", required=True, help="run directory: train_state.pt, metrics.jsonl, "
                   "model/ (the checkpoint to pass as --model)")
    p.add_argument("--corpus", nargs="+", metavar="kjv|FILE", help="'kjv' (the King James "
                   "Bible, default) or UTF-8 text files, concatenated")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--steps", type=int, help=f"total training steps (default {P.steps})")
    p.add_argument("--batch-size", type=int, help=f"windows per step (default {P.batch_size})")
    p.add_argument("--seq-len", type=int, help=f"characters per window (default {P.seq_len})")
    p.add_argument("--lr", type=float, help=f"peak Adam learning rate (default {P.lr})")
    p.add_argument("--min-lr", type=float, help=f"learning rate at the end (default {P.min_lr})")
    p.add_argument("--lr-decay", choices=["cosine", "linear", "none"],
                   help=f"decay after warmup (default {P.lr_decay})")
    p.add_argument("--warmup-steps", type=int, help=f"linear warmup (default {P.warmup_steps})")
    p.add_argument("--grad-clip", type=float, help=f"global-norm clip, 0 = off (default "
                   f"{P.grad_clip})")
    p.add_argument("--val-frac", type=float, help=f"held-out tail of the corpus (default "
                   f"{P.val_frac})")
    p.add_argument("--eval-every", type=int, help=f"validate + log every N steps (default "
                   f"{P.eval_every})")
    p.add_argument("--ckpt-every", type=int, help=f"checkpoint every N steps (default "
                   f"{P.ckpt_every})")
    p.add_argument("--seed", type=int, help=f"init and batch order (default {P.seed})")
    p.add_argument("--embed-dim", type=int, help=f"embedding size (default {M.embed_dim})")
    p.add_argument("--hidden-size", type=int, help=f"recurrent units (default {M.hidden_size})")
    p.add_argument("--num-layers", type=int, help=f"recurrent layers (default {M.num_layers})")
    p.add_argument("--cell", choices=["gru", "lstm"], help=f"recurrent cell (default {M.cell})")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: the GRU's recurrent matmuls in bfloat16 (default fp32, exact)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=pretrain_cmd)

    # --- evaluate
    p = sub.add_parser("evaluate", help="loss, accuracy and bits/char of a model",
                       description="Pooled loss (nats), accuracy (argmax == target) and bits per "
                       "char over the federated Shakespeare split, or over random text.")
    p.add_argument("--model", required=True, help="'pretrained' or a checkpoint directory")
    p.add_argument("--split", choices=["test", "train"], default="test", help="which split "
                   "(default test)")
    p.add_argument("--data", help="your own federated text instead of Shakespeare: a directory "
                   "of <client>.txt files or a .jsonl file")
    p.add_argument("--clients", help="comma-separated client ids (default: all clients)")
    p.add_argument("--random", action="store_true", help="uniformly random text over the 86 "
                   "characters instead: accuracy should come out near 1/86")
    p.add_argument("--batch-size", type=int, default=8, help="the tutorial's batch size "
                   "(default 8; decides only --max-batches' reach)")
    p.add_argument("--seq-len", type=int, default=100, help="characters per row (default 100)")
    p.add_argument("--max-batches", type=int, help="at most N batches per client (with "
                   "--random: in all; default 100 there)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --random text (default 0)")
    p.add_argument("--cache-dir", help="data cache (default $FEDTEXT_CACHE or ~/.cache/fedtext)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=evaluate_cmd)

    # --- generate (nanoGPT sample.py's knobs)
    p = sub.add_parser("generate", help="sample text from a model, streamed as it comes",
                       description="Sample characters one at a time, carrying the recurrent "
                       "state; the same --seed gives the same text.")
    p.add_argument("--model", required=True, help="'pretrained' or a checkpoint directory")
    p.add_argument("--prompt", required=True, help="text to start from")
    p.add_argument("--length", type=int, default=200, help="characters to generate (default "
                   "200, the tutorial's)")
    p.add_argument("--temperature", type=float, default=1.0, help="< 1 safer, > 1 wilder, "
                   "0 greedy (default 1.0)")
    p.add_argument("--top-k", type=int, help="sample among the k likeliest characters only")
    p.add_argument("--seed", type=int, help="random seed (default: fresh each run); sample i "
                   "uses seed + i")
    p.add_argument("--num-samples", type=int, default=1, help="how many samples (default 1)")
    p.set_defaults(func=generate_cmd)


def load_model(spec: str):
    """--model -> (CharRNN, config.json dict). A pretrain run directory stands for its model/."""
    from fedtext.checkpoint import load_checkpoint, resolve_model_spec

    run = Path(spec)
    if (run / STATE_FILE).is_file() and (run / MODEL_DIR).is_dir():
        spec = str(run / MODEL_DIR)
    return load_checkpoint(resolve_model_spec(spec))


# ----------------------------------------------------------------------------- pretrain


def pretrain_cmd(args) -> int:
    from fedtext.pretrain import load_corpus, load_train_state, pretrain

    given = {f.name: getattr(args, f.name) for f in fields(PretrainConfig)
             if getattr(args, f.name, None) is not None}
    given_model = {f.name: getattr(args, f.name) for f in fields(ModelConfig)
                   if getattr(args, f.name, None) is not None}
    out = Path(args.out)
    sources = args.corpus
    cfg, model_cfg = asdict(P), M.to_dict()
    if args.resume:  # start from the run's own settings; flags given must agree (checked later)
        saved = load_train_state(out / STATE_FILE)
        cfg, model_cfg = saved["config"], saved["model_config"]
        sources = sources or saved["corpus"]["sources"]
    try:
        cfg = PretrainConfig(**{**cfg, **given})
        model_cfg = ModelConfig(**{**model_cfg, **given_model})
    except ValueError as e:
        raise FedtextError(str(e)) from None
    if args.threads is not None:
        if args.threads < 1:
            raise FedtextError(f"--threads must be >= 1, not {args.threads}")
        torch.set_num_threads(args.threads)

    corpus = load_corpus(sources or [KJV])
    command = shlex.join(["fedtext", *getattr(args, "argv", sys.argv[1:])])
    row = pretrain(out, cfg, model_cfg, corpus, resume=args.resume, precision=args.precision,
                   command=command, progress=not args.no_progress)
    done = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k in ("train_loss", "val_loss",
                                                                      "val_accuracy"))
    print(f"step {row['step']}{': ' + done if done else ''}; model in {out / MODEL_DIR}")
    return 0


# ----------------------------------------------------------------------------- evaluate


def evaluate_cmd(args) -> int:
    from fedtext.batching import random_text_batches
    from fedtext.evaluate import evaluate_batches, evaluate_store

    for flag in ("batch_size", "seq_len", "max_batches"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise FedtextError(f"--{flag.replace('_', '-')} must be >= 1, not {v}")
    model, _ = load_model(args.model)
    if args.random:
        if args.clients is not None or args.data:
            raise FedtextError("--random evaluates on random text: it takes no --clients or --data")
        batches = random_text_batches(args.max_batches or 100, args.batch_size, args.seq_len,
                                      seed=args.seed)
        r, split, clients = evaluate_batches(model, batches), "random", 0
    else:
        from fedtext.data import load_dataset

        ds = load_dataset(args.data, cache_dir=args.cache_dir)
        store = getattr(ds, args.split)
        ids = None
        if args.clients is not None:
            ids = [c.strip() for c in args.clients.split(",") if c.strip()]
            if not ids:
                raise FedtextError("--clients is empty")
        r = evaluate_store(model, store, ids, batch_size=args.batch_size, seq_len=args.seq_len,
                           max_batches=args.max_batches)
        split, clients = args.split, len(ids) if ids is not None else len(store.client_ids)
    data = "random" if args.random else ds.name
    out = {"model": args.model, "data": data, "split": split, "clients": clients, **r.to_dict()}
    if args.json:
        # JSON has no NaN: no counted target gives null loss/accuracy.
        print(json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v
                          for k, v in out.items()}))
    else:
        where = "random text" if args.random else f"{data} {split} split, {clients:,} clients"
        print(f"{args.model} on {where}: {r.predictions:,} predictions")
        print(f"loss {r.loss:.4f} nats ({r.bits_per_char:.4f} bits/char), "
              f"accuracy {r.accuracy:.4f}" + (f" (random guessing: {1 / 86:.4f})"
                                               if args.random else ""))
    return 0


# ----------------------------------------------------------------------------- generate


def generate_cmd(args) -> int:
    from fedtext.generate import check_sampling, prompt_ids, stream_text

    check_sampling(args.length, args.temperature, args.top_k)
    prompt_ids(args.prompt)  # refuse a bad prompt before loading the model
    if args.num_samples < 1:
        raise FedtextError(f"--num-samples must be >= 1, not {args.num_samples}")
    model, _ = load_model(args.model)
    seed = args.seed if args.seed is not None else secrets.randbits(31)
    for i in range(args.num_samples):
        if i:
            sys.stdout.write("\n---\n")
        sys.stdout.write(args.prompt)
        for ch in stream_text(model, args.prompt, args.length, args.temperature, args.top_k,
                              seed + i):
            sys.stdout.write(ch)
            sys.stdout.flush()  # stream: each character shows as soon as it is sampled
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0
