"""`fedtext convert-keras FILE OUT`: turn a Keras char-RNN (.h5 / .keras) into a checkpoint."""

from __future__ import annotations

import shlex


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


def convert_keras_command(args) -> int:
    # Imported here so that `fedtext --help` does not pay for torch and h5py.
    from fedtext.checkpoint import DTYPES, read_checkpoint_config
    from fedtext.keras_import import convert_keras

    command = shlex.join(["fedtext", "convert-keras", args.file, args.out, "--dtype",
                          args.dtype] + (["--force"] if args.force else []))
    out = convert_keras(args.file, args.out, force=args.force, dtype=DTYPES[args.dtype],
                        command=command)
    config = read_checkpoint_config(out)
    m, prov = config["model"], config["provenance"]
    print(f"{args.file}: Keras {prov['keras_variant']}, embed {m['embed_dim']}, "
          f"hidden {m['hidden_size']} -> {out} ({config['dtype']})")
    return 0
