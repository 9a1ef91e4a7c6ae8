"""`fedtext convert-keras FILE OUT` and `fedtext export-keras MODEL OUT.h5`: Keras both ways."""

from __future__ import annotations

import shlex

from fedtext.errors import FedtextError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-keras",
        help="import a Keras char-RNN (.h5 or .keras) as a fedtext checkpoint",
        description="Import the tutorial's Keras model (Embedding -> GRU -> Dense over its 86 "
                    "characters; GRU reset_after False or True) without TensorFlow, and write "
                    "it as a fedtext checkpoint directory.",
    )
    p.add_argument("file", metavar="FILE", help="Keras model: HDF5 .h5 or Keras v3 .keras")
    p.add_argument("out", metavar="OUT", help="checkpoint directory to write")
    p.add_argument("--force", action="store_true", help="replace OUT if it holds a checkpoint")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="storage dtype (loads back as float32; 16-bit halves the file)")
    p.set_defaults(func=convert_keras_command)

    p = subparsers.add_parser(
        "export-keras",
        help="write a model as the tutorial's Keras .h5 file",
        description="Write a fedtext model (a checkpoint, a run directory, or 'pretrained') in "
                    "the Keras 2.14 HDF5 layout of the tutorial's model, GRU reset_after as "
                    "the model has it, so the trained weights load into the original Keras "
                    "model (tf.keras.models.load_model or model.load_weights).",
    )
    p.add_argument("model", metavar="MODEL", help="'pretrained', a checkpoint or a run directory")
    p.add_argument("out", metavar="OUT.h5", help="the .h5 file to write")
    p.add_argument("--force", action="store_true", help="replace OUT.h5 if it exists")
    p.set_defaults(func=export_keras_command)


def convert_keras_command(args) -> int:
    # Imported here so that `fedtext --help` does not pay for torch and h5py.
    from fedtext.model.checkpoint import DTYPES, read_checkpoint_config
    from fedtext.model.keras import convert_keras

    command = shlex.join(["fedtext", "convert-keras", args.file, args.out, "--dtype",
                          args.dtype] + (["--force"] if args.force else []))
    out = convert_keras(args.file, args.out, force=args.force, dtype=DTYPES[args.dtype],
                        command=command)
    config = read_checkpoint_config(out)
    m, prov = config["model"], config["provenance"]
    print(f"{args.file}: Keras {prov['keras_variant']}, embed {m['embed_dim']}, "
          f"hidden {m['hidden_size']} -> {out} ({config['dtype']})")
    return 0


def export_keras_command(args) -> int:
    from pathlib import Path

    from fedtext.cli.evaluate import load_model
    from fedtext.model.keras import export_keras

    out = Path(args.out)
    if out.is_dir():
        raise FedtextError(f"{out} is a directory; give the .h5 file to write")
    if out.exists() and not args.force:
        raise FedtextError(f"{out} already exists (use --force to replace it)")
    model, vocab, _ = load_model(args.model)
    export_keras(model, out, vocab)
    c = model.config
    print(f"{args.model}: GRU {c.hidden_size} (reset_after={c.reset_after}), embed "
          f"{c.embed_dim} -> {out} (Keras HDF5)")
    return 0
