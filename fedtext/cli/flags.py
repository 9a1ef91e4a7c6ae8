"""The config flags shared by `fedtext train` and `fedtext tutorial`: one per config field.

Flags come from fedtext.config.flag_table(), so a field added to a config dataclass is a flag
with no edit here. Values stay strings until `config_sources` hands them to config.merge, so a
bad value is one FedtextError line naming the flag (argparse would print its usage block).
"""

from __future__ import annotations

import argparse

from fedtext.config import FLAGS, ExperimentConfig, flag_table, load_toml

DEST = "cfg__"  # argparse dest prefix of config flags (kept apart from the command's own)


def _default_of(cfg: ExperimentConfig, path: tuple[str, ...]):
    v = cfg
    for p in path:
        v = getattr(v, p)
    return v


def _shown(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, tuple):
        return ",".join(v) or "none"
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


def add_config_flags(p: argparse.ArgumentParser, defaults: ExperimentConfig) -> None:
    """--config FILE.toml and one flag per config field (all default to None: only the flags
    given override anything)."""
    p.add_argument("--config", metavar="FILE.toml", help="TOML file of settings (tables "
                   "[run], [model], [data], [client], ...; see configs/); flags override it")
    for f in flag_table():
        dest = DEST + f.name.replace("-", "_")
        default = _shown(_default_of(defaults, f.path))
        shown = f"{f.help} (default {default})" if "default" not in f.help else f.help
        if f.type is bool:
            if f.off_flag:
                g = p.add_mutually_exclusive_group()
                g.add_argument(f"--{f.off_flag}", dest=dest, action="store_false", default=None,
                               help=f"the opposite of --{f.name}")
                g.add_argument(f"--{f.name}", dest=dest, action="store_true", default=None,
                               help=shown)
            else:
                p.add_argument(f"--{f.name}", dest=dest, action=argparse.BooleanOptionalAction,
                               default=None, help=shown)
            continue
        metavar = f.metavar or ("{" + ",".join(f.choices) + "}" if f.choices
                                else f.path[-1].split("_")[-1].upper())
        p.add_argument(f"--{f.name}", dest=dest, default=None, metavar=metavar, help=shown)


def config_sources(args) -> list[tuple[str, dict]]:
    """The (where, settings) sources of the flags: --config FILE, then the flags given."""
    sources = []
    if getattr(args, "config", None):
        sources.append((args.config, load_toml(args.config)))
    given = {}
    for f in flag_table():
        value = getattr(args, DEST + f.name.replace("-", "_"), None)
        if value is not None:
            given[f.name] = value
    sources.append((FLAGS, given))
    return sources


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """Flags about this invocation, not the experiment (not saved in config.toml)."""
    p.add_argument("--resume", action="store_true", help="continue the run in --out (its "
                   "saved settings; only --rounds, --eval-every and how clients compute may "
                   "change)")
    p.add_argument("--cache-dir", help="data cache (default $FEDTEXT_CACHE or ~/.cache/fedtext)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard events")
