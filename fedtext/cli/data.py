"""`fedtext data ...`: build, inspect and browse the federated dataset.

    fedtext data prepare [--rebuild]           build (or find) the Shakespeare cache
    fedtext data stats [--json]                sizes, percentiles, OOV, what batching keeps
    fedtext data clients [--split] [--sort]    list client ids with their sizes
    fedtext data show CLIENT [-n 3]            print a client's first snippets

Every command takes --data PATH (a directory of .txt files or a .jsonl file) to use the
user's own federated text instead of Shakespeare, and --cache-dir DIR.
"""

from __future__ import annotations

import argparse
import json
import time

from fedtext.data.store import dataset_stats, load_dataset
from fedtext.errors import FedtextError


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="PATH", help="your own data: a dir of .txt or a .jsonl")
    p.add_argument("--cache-dir", metavar="DIR", help="cache directory (default $FEDTEXT_CACHE)")


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="build and inspect the federated dataset")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda args: data.print_help() or 2)

    p = sub.add_parser("prepare", help="build the federated Shakespeare cache (or find it)")
    _common(p)
    p.add_argument("--rebuild", action="store_true", help="rebuild even if the cache is fresh")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("stats", help="clients, snippets, chars, OOV, what batching keeps")
    _common(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--batch-size", type=_positive, default=8, help="batch size (tutorial: 8)")
    p.add_argument("--seq-len", type=_positive, default=100, help="sequence length (tutorial: 100)")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("clients", help="list client ids with their sizes")
    _common(p)
    p.add_argument("--split", choices=("train", "test"), default="train", help="which split")
    p.add_argument("--sort", choices=("id", "chars"), default="id", help="order of the list")
    p.add_argument("--grep", metavar="TEXT", help="only ids containing TEXT (case-insensitive)")
    p.set_defaults(func=cmd_clients)

    p = sub.add_parser("show", help="print a client's first snippets")
    _common(p)
    p.add_argument("client", metavar="CLIENT", help="client id, e.g. KING_LEAR_KENT")
    p.add_argument("--split", choices=("train", "test"), default="train", help="which split")
    p.add_argument("-n", type=int, default=3, help="how many snippets (default 3; 0 = all)")
    p.set_defaults(func=cmd_show)


def _load(args, rebuild: bool = False):
    return load_dataset(args.data, cache_dir=args.cache_dir, rebuild=rebuild)


def cmd_prepare(args) -> int:
    if args.data:
        raise FedtextError("--data needs no preparing: it is read directly by every command")
    t0 = time.perf_counter()
    ds = _load(args, rebuild=args.rebuild)
    print(f"{ds.name}: {len(ds.train)} train / {len(ds.test)} test clients from {ds.source}")
    print(f"cache: {ds.train.directory} ({time.perf_counter() - t0:.2f} s)")
    return 0


def cmd_stats(args) -> int:
    s = dataset_stats(_load(args), batch_size=args.batch_size, seq_len=args.seq_len)
    if args.json:
        print(json.dumps(s))
        return 0
    print(f"{s['name']} ({s['source']})\n")
    print(f"{'':24}{'train':>12}{'test':>12}")
    for key in ("clients", "snippets", "chars"):
        print(f"{key:24}{s[f'train_{key}']:>12,}{s[f'test_{key}']:>12,}")
    print("\nchars per client")
    for q in s["train_chars_per_client"]:
        tr, te = s["train_chars_per_client"][q], s["test_chars_per_client"][q]
        print(f"  {q:22}{tr:>12,}{te:>12,}")
    B, T = s["batch_size"], s["seq_len"]
    print(f"\nbatching (batch {B} x seq {T}; drop_remainder needs {(T + 1) * B} chars)")
    for mode in ("drop_remainder", "padded"):
        print(f"  {mode:22}{'clients':>12}{'targets':>12}")
        tr = (s[f"clients_kept_{mode}"], s[f"targets_{mode}"])
        te = (s[f"test_clients_kept_{mode}"], s[f"test_targets_{mode}"])
        print(f"    {'train':20}{tr[0]:>12,}{tr[1]:>12,}")
        print(f"    {'test':20}{te[0]:>12,}{te[1]:>12,}")
    print(f"\nclients left out (< 2 snippets): {s['left_out_clients']:,}")
    oov = ", ".join(f"{c!r} x{k}" for c, k in list(s["oov"].items())[:10])
    print(f"out-of-vocabulary chars: {s['oov_chars']:,}" + (f" ({oov})" if oov else ""))
    return 0


def cmd_clients(args) -> int:
    store = getattr(_load(args), args.split)
    sizes, snips = store.chars_per_client, store.snippets_per_client
    rows = [i for i, cid in enumerate(store.client_ids) if (args.grep or "").upper() in cid.upper()]
    if args.sort == "chars":
        rows.sort(key=lambda i: -sizes[i])
    for i in rows:
        print(f"{store.client_ids[i]:48} {snips[i]:>6} snippets {sizes[i]:>8} chars")
    return 0


def cmd_show(args) -> int:
    if args.n < 0:
        raise FedtextError(f"-n must be >= 0, got {args.n}")
    store = getattr(_load(args), args.split)
    snippets = store.snippets(args.client)  # unknown ids raise with close matches
    shown = snippets if args.n == 0 else snippets[: args.n]
    print(f"{args.client} ({args.split}): {len(snippets)} snippets, showing {len(shown)}")
    for k, text in enumerate(shown, 1):
        print(f"\n--- {k} ---\n{text}")
    return 0
