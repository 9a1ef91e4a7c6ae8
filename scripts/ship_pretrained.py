"""Ship a pre-training run's model as the package's `--model pretrained` (fp16, < 9 MB).

    .venv/bin/python scripts/ship_pretrained.py runs/pretrain-kjv [--eval-json FILE]

Copies RUN/model into fedtext/assets/pretrained/ stored as float16 (it loads back as float32),
keeping its provenance (corpus, the exact pretrain command, steps, losses) and adding where it
came from and, if given, the held-out evaluation that `fedtext evaluate --json` printed.
"""

import argparse
import json
from pathlib import Path

import torch

from fedtext.model.checkpoint import PRETRAINED_DIR, load_checkpoint, resolve_model_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a `fedtext pretrain --out` directory (or a checkpoint)")
    ap.add_argument("--eval-json", help="output of `fedtext evaluate --json` for this model")
    ap.add_argument("--history", action="append", default=[], help="a command of the run, "
                    "in order (repeat): a resumed run's provenance keeps only the last one")
    args = ap.parse_args()
    from fedtext.model.checkpoint import save_checkpoint

    src = resolve_model_spec(args.run)
    model, config = load_checkpoint(src)
    provenance = dict(config["provenance"])
    provenance["shipped_from"] = str(src)
    provenance["shipped_dtype"] = "float16"
    if args.history:
        provenance["commands"] = args.history
    if args.eval_json:
        provenance["shakespeare_test_eval"] = json.loads(Path(args.eval_json).read_text())
    out = save_checkpoint(PRETRAINED_DIR, model, provenance, dtype=torch.float16)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"shipped {src} -> {out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
