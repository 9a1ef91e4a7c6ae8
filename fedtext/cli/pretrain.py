"""`fedtext pretrain`: central training on a text corpus, resumable (fedtext.pretrain).

    fedtext pretrain --out runs/kjv --steps 5000            # the King James Bible
    fedtext pretrain --out runs/kjv --resume                # carry on, bit for bit
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import asdict, fields
from pathlib import Path

from fedtext.errors import FedtextError
from fedtext.model.char_rnn import Compute, ModelConfig
from fedtext.model.recurrences import IMPLS, PRECISIONS
from fedtext.pretrain import KJV, MODEL_DIR, STATE_FILE, PretrainConfig

P, M = PretrainConfig(), ModelConfig()


def register(sub) -> None:
    # Flags left out take the defaults, or on --resume the run's own settings.
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
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="bf16: the GRU's recurrent matmuls in bfloat16 (default fp32, exact)")
    p.add_argument("--gru-impl", choices=IMPLS, default="auto", help="GRU implementation "
                   "(default auto: the fastest exact one here)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=pretrain_cmd)


def set_threads(n: int | None) -> None:
    if n is not None:
        if n < 1:
            raise FedtextError(f"--threads must be >= 1, not {n}")
        import torch

        torch.set_num_threads(n)


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
        if out.is_file():
            raise FedtextError(f"--out {out} is a file, not a run directory")
        saved = load_train_state(out / STATE_FILE)
        cfg, model_cfg = saved["config"], saved["model_config"]
        sources = sources or saved["corpus"]["sources"]
    try:
        cfg = PretrainConfig(**{**cfg, **given})
        model_cfg = ModelConfig(**{**model_cfg, **given_model})
    except (ValueError, TypeError) as e:
        raise FedtextError(str(e)) from None
    set_threads(args.threads)
    from fedtext.model.spec import check_device

    check_device(args.device)

    corpus = load_corpus(sources or [KJV])
    command = shlex.join(["fedtext", *getattr(args, "argv", sys.argv[1:])])
    row = pretrain(out, cfg, model_cfg, corpus, resume=args.resume,
                   compute=Compute(args.gru_impl, args.precision), command=command,
                   progress=not args.no_progress, device=args.device)
    done = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k in ("train_loss", "val_loss",
                                                                      "val_accuracy"))
    print(f"step {row['step']}{': ' + done if done else ''}; model in {out / MODEL_DIR}")
    return 0
