"""`fedtext report RUN [RUN ...] --out report.html`: one self-contained HTML run report."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("report", help="an HTML report of runs (config, curves, table, "
                       "per-client accuracy, samples)",
                       description="Read run directories (config.toml, metrics.jsonl, and "
                       "what `fedtext benchmark` records) and write one self-contained HTML "
                       "file: it needs no network to view.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directory (several: on shared "
                   "axes)")
    p.add_argument("--out", default="report.html", help="the HTML file (default report.html)")
    p.add_argument("--title", help="the report's title")
    p.set_defaults(func=report_cmd)


def report_cmd(args) -> int:
    from fedtext.run.report import write_report

    print(write_report(args.runs, args.out, title=args.title))
    return 0
