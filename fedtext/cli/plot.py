"""`fedtext plot RUN [RUN ...]`: loss and accuracy curves as PNG files (fedtext.run.plot)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("plot", help="plot runs' loss and accuracy curves (PNG)",
                       description="Read RUN/metrics.jsonl and write loss.png and accuracy.png "
                       "(train and held-out eval per round; a pretrain run: per step).")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directory (several: compared "
                   "in one plot)")
    p.add_argument("--out", help="where to write the PNGs (default: the first RUN)")
    p.set_defaults(func=plot_cmd)


def plot_cmd(args) -> int:
    from fedtext.run.plot import plot_runs

    for path in plot_runs(args.runs, args.out):
        print(path)
    return 0
