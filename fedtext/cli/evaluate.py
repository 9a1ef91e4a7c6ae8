"""`fedtext evaluate`: loss, accuracy and bits/char of a model on held-out text.

    fedtext evaluate --model runs/kjv/model                 # federated Shakespeare test split
    fedtext evaluate --model pretrained --random            # accuracy ~ 1/86
"""

from __future__ import annotations

import json
import math

from fedtext.errors import FedtextError


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="loss, accuracy and bits/char of a model",
                       description="Pooled loss (nats), accuracy (argmax == target) and bits per "
                       "char over the federated Shakespeare split, or over random text; with "
                       "the per-client distribution of accuracy.")
    p.add_argument("--model", required=True, help="'pretrained', a checkpoint directory or a "
                   "run directory")
    p.add_argument("--split", choices=["test", "train"], default="test", help="which split "
                   "(default test)")
    p.add_argument("--data", help="your own federated text instead of Shakespeare: a directory "
                   "of <client>.txt files or a .jsonl file")
    p.add_argument("--clients", help="comma-separated client ids (default: all clients)")
    p.add_argument("--random", action="store_true", help="uniformly random text over the 86 "
                   "characters instead: accuracy should come out near 1/86")
    p.add_argument("--batch-size", type=int, help="rows per batch (default: the model's "
                   "task's: 8 for the tutorial, 4 for reddi2021; decides only --max-batches' "
                   "reach)")
    p.add_argument("--seq-len", type=int, help="characters per row (default: the model's "
                   "task's: 100 for the tutorial, 80 for reddi2021)")
    p.add_argument("--max-batches", type=int, help="at most N batches per client (with "
                   "--random: in all; default 100 there)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --random text (default 0)")
    p.add_argument("--cache-dir", help="data cache (default $FEDTEXT_CACHE or ~/.cache/fedtext)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.set_defaults(func=evaluate_cmd)


def load_model(spec: str, device: str = "cpu"):
    """--model -> (CharRNN, Vocab, config.json dict); a run directory stands for its model."""
    from fedtext.model.checkpoint import checkpoint_vocab, load_checkpoint, resolve_model_spec
    from fedtext.model.spec import check_device

    check_device(device)
    model, config = load_checkpoint(resolve_model_spec(spec), device=device)
    return model, checkpoint_vocab(config), config


def model_task(vocab, config: dict):
    """The task whose preprocessing the model was trained with: the one its checkpoint names
    (a `fedtext train` run records it), else the first with its vocabulary, else the stream
    preprocessing of the tutorial over the model's vocabulary."""
    from fedtext.data.tasks import TASKS, Task

    named = (config.get("provenance") or {}).get("task")
    candidates = [named] if named in TASKS.names else []
    candidates += [n for n in TASKS.names if n != named]
    for name in candidates:
        if TASKS[name].vocab == vocab:
            return TASKS[name]
    return Task("evaluate", vocab, "", {}, data_defaults=TASKS["tutorial"].data_defaults)


def evaluate_cmd(args) -> int:
    from fedtext.data.batching import random_text_batches
    from fedtext.data.store import load_dataset
    from fedtext.data.tasks import DataConfig
    from fedtext.run.evaluation import EvalResult, build_eval_set, evaluate, evaluate_batches

    for flag in ("batch_size", "seq_len", "max_batches"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise FedtextError(f"--{flag.replace('_', '-')} must be >= 1, not {v}")
    if args.random and (args.clients is not None or args.data):
        raise FedtextError("--random evaluates on random text: it takes no --clients or --data")
    model, vocab, config = load_model(args.model, args.device)
    task = model_task(vocab, config)
    args.batch_size = args.batch_size or task.data_defaults["batch_size"]
    args.seq_len = args.seq_len or task.data_defaults["seq_len"]
    extra = {}
    if args.random:
        batches = random_text_batches(args.max_batches or 100, args.batch_size, args.seq_len,
                                      seed=args.seed, vocab=vocab)
        r, split, clients, data = evaluate_batches(model, batches), "random", 0, "random"
    else:
        ds = load_dataset(args.data, cache_dir=args.cache_dir)
        store = getattr(ds, args.split)
        ids = list(store.client_ids)
        if args.clients is not None:
            ids = [c.strip() for c in args.clients.split(",") if c.strip()]
            if not ids:
                raise FedtextError("--clients is empty")
        cfg = DataConfig(batch_size=args.batch_size, seq_len=args.seq_len)
        if args.max_batches is None:
            es = build_eval_set(store, ids, task, cfg)
        else:  # the tutorial's .take(n): the first n batches of each client
            from fedtext.run.evaluation import EvalSet

            for cid in ids:
                store.index(cid)
            es = EvalSet.from_batches((task.batches(store, cid, cfg, padded=True,
                                                    max_batches=args.max_batches)
                                       for cid in ids), ids)
        row = evaluate(model, es, progress=not args.no_progress and not args.json, prefix="")
        r = EvalResult(row["loss"], row["accuracy"], row["chars"])
        extra = {k: row[k] for k in ("unweighted_loss", "unweighted_accuracy", "accuracy_p10",
                                     "accuracy_p50", "accuracy_p90")}
        split, clients, data = args.split, len(ids), ds.name
    out = {"model": args.model, "data": data, "split": split, "clients": clients, **r.to_dict(),
           **extra}
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
        if extra:
            print(f"per client: mean accuracy {extra['unweighted_accuracy']:.4f}, p10 / p50 / "
                  f"p90 {extra['accuracy_p10']:.4f} / {extra['accuracy_p50']:.4f} / "
                  f"{extra['accuracy_p90']:.4f}")
    return 0

