"""One experiment config: nested TOML tables <-> frozen dataclasses that live beside their
consumers, and the command-line flags that fill the same dataclasses.

    [run]         run.experiment.RunConfig            rounds, seed
    [model]       model.spec.ModelSpec                init model, scratch architecture, impl
    [data]        data.tasks.DataConfig               source, task, batching
    [sampling]    fl.sampling.SamplingConfig          clients per round, fixed clients
    [client]      fl.client.ClientConfig              local training (+ [client.schedule])
    [server]      fl.server_optimizers.ServerConfig   server optimizer (+ [server.schedule])
    [aggregator]  fl.aggregators.AggregatorConfig     mean / norm bound, client weighting
    [faults]      fl.algorithm.FaultConfig            failing clients: fail or drop
    [dp]          fl.privacy.DPConfig                 DP-FedAvg: clipping, noise, accounting
    [attack]      fl.attacks.AttackConfig             simulated attackers (off by default)
    [compression] fl.compression.CompressionConfig    what clients upload (float32 default)
    [eval]        run.evaluation.EvalConfig           held-out evaluation
    [backend]     backends.base.BackendConfig         where clients train

    cfg = merge(ExperimentConfig(), ("configs/tiny.toml", load_toml("configs/tiny.toml")),
                (FLAGS, {"client-lr": "0.1"}))   # defaults < TOML < flags
    save_toml(cfg, "runs/x/config.toml")         # what the run really used

Every leaf field has a flag (its `flag` metadata, e.g. `client.lr` <-> `--client-lr`; the
names of fedtext 0.1 are kept). A setting left out of TOML means the field's default; TOML
has no null, so optional fields are simply omitted (and for `max_batches` / `eval.clients`, 0
means "all"). A flat TOML file of fedtext 0.1 (`client_lr = 0.5` at the top level) still
loads: its keys are the flag names, mapped to their tables. Errors name the file (or flag) and
the key: `c.toml: [client] lr must be a finite number > 0, not -0.1`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import tomli_w

from fedtext.backends.base import BackendConfig
from fedtext.data.tasks import DataConfig
from fedtext.errors import FedtextError
from fedtext.fl.aggregators import AggregatorConfig
from fedtext.fl.algorithm import FaultConfig
from fedtext.fl.attacks import AttackConfig
from fedtext.fl.client import ClientConfig
from fedtext.fl.compression import CompressionConfig
from fedtext.fl.privacy import DPConfig
from fedtext.fl.sampling import SamplingConfig
from fedtext.fl.server_optimizers import ServerConfig
from fedtext.model.spec import ModelSpec
from fedtext.paths import atomic_path
from fedtext.run.evaluation import EvalConfig
from fedtext.run.experiment import RunConfig

FLAGS = "command line"  # the `where` of command-line overrides (errors name the flag)
# Settings a resumed run may change: how long it runs, how often it evaluates, and where and
# how fast clients compute; never what a finished round computed.
RESUMABLE = (("run", "rounds"), ("eval", "every"), ("model", "impl"), ("backend",),
             ("faults", "client_timeout"))


@dataclass(frozen=True)
class ExperimentConfig:
    run: RunConfig = RunConfig()
    model: ModelSpec = ModelSpec()
    data: DataConfig = DataConfig()
    sampling: SamplingConfig = SamplingConfig()
    client: ClientConfig = ClientConfig()
    server: ServerConfig = ServerConfig()
    aggregator: AggregatorConfig = AggregatorConfig()
    faults: FaultConfig = FaultConfig()
    dp: DPConfig = DPConfig()
    attack: AttackConfig = AttackConfig()
    compression: CompressionConfig = CompressionConfig()
    eval: EvalConfig = EvalConfig()
    backend: BackendConfig = BackendConfig()

    def __post_init__(self):
        if self.backend.device != "cpu":
            from fedtext.model.spec import check_device

            check_device(self.backend.device)

    def resolved(self) -> ExperimentConfig:
        """Defaults that depend on other settings spelled out (the server optimizer's)."""
        return replace(self, server=self.server.resolved())


SECTIONS = tuple(f.name for f in fields(ExperimentConfig))


# ----------------------------------------------------------------------------- the flags


class Flag(NamedTuple):
    """One command-line flag and the config field it sets."""

    name: str  # without the leading dashes: "client-lr"
    path: tuple[str, ...]  # ("client", "lr")
    type: Any  # the field's type: int, float, bool, str, tuple, or Optional of one
    default: Any
    help: str
    metavar: str | None
    choices: tuple | None
    off_flag: str | None  # a bool's "off" flag (--padding for drop_remainder)
    zero_is_none: bool  # "0 = all" on the command line and in TOML


def _leaves(cls, path=(), prefix=""):
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        meta = f.metadata
        if meta.get("runtime"):
            continue
        t = hints[f.name]
        if is_dataclass(t):
            yield from _leaves(t, path + (f.name,), meta.get("flag_prefix", prefix))
            continue
        name = meta.get("flag", f.name.replace("_", "-"))
        if prefix:
            name = f"{prefix}-{name}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        yield Flag(name, path + (f.name,), t, default, meta.get("help", ""),
                   meta.get("metavar"), meta.get("choices"), meta.get("off_flag"),
                   f.name in ("max_batches", "clients") and _optional(t) is int)


def flag_table() -> list[Flag]:
    """Every settable field, with its flag, in config order."""
    hints = typing.get_type_hints(ExperimentConfig)
    out = []
    for section in SECTIONS:
        out += list(_leaves(hints[section], (section,)))
    names = [f.name for f in out]
    assert len(names) == len(set(names)), "two config fields share a flag"
    return out


def _optional(t):
    """int for `int | None`, None for a plain type."""
    args = typing.get_args(t)
    if isinstance(t, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None))
    return None


# ----------------------------------------------------------------------------- values


def coerce(flag: Flag, value, where: str):
    """A TOML value or flag string as the field's type, or a FedtextError naming it."""
    t = _optional(flag.type) or flag.type
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}

    def bad():
        return FedtextError(f"{_name(flag, where)} must be {kind.get(t, 'a list of strings')}, "
                            f"not {value!r}")

    if isinstance(value, str) and where == FLAGS and t in (int, float):
        try:
            value = t(value)
        except ValueError:
            raise bad() from None
    if t is bool:
        if not isinstance(value, bool):
            raise bad()
    elif t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
    elif t is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad()
        value = float(value)
        if not math.isfinite(value):
            raise FedtextError(f"{_name(flag, where)} must be a finite number, not {value}")
    elif t is str:
        if not isinstance(value, str):
            raise bad()
    else:  # tuple[str, ...]: a TOML list, or "a,b,c" from the command line
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise bad()
        value = tuple(value)
    if flag.zero_is_none and value == 0:
        return None
    if flag.choices and value not in flag.choices:
        near = difflib.get_close_matches(str(value), flag.choices, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise FedtextError(f"{_name(flag, where)} must be one of {', '.join(flag.choices)}, "
                           f"not {value!r}{hint}")
    return value


def _name(flag: Flag, where: str) -> str:
    """How an error names the setting: `--client-lr`, or `file.toml: [client] lr`."""
    if where == FLAGS:
        return f"--{flag.name}"
    return f"{where}: [{'.'.join(flag.path[:-1])}] {flag.path[-1]}"


# ----------------------------------------------------------------------------- merging


def _nested(cfg) -> dict:
    """A config (or section) as nested plain dicts, runtime fields left out."""
    out = {}
    for f in fields(cfg):
        if f.metadata.get("runtime"):
            continue
        v = getattr(cfg, f.name)
        out[f.name] = _nested(v) if is_dataclass(v) else v
    return out


def _build(cls, values: dict, origin: dict, path=()):
    """cls(**values), nested; a FedtextError from a section names where its field was set."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name in values:
            v = values[f.name]
            kwargs[f.name] = _build(hints[f.name], v, origin, path + (f.name,)) \
                if is_dataclass(hints[f.name]) else v
    try:
        return cls(**kwargs)
    except FedtextError as e:
        msg = str(e)
        key = msg.split(" ", 1)[0]
        if path and key in {f.name for f in fields(cls)}:
            where, flag = origin.get(path + (key,), (None, None))
            if where == FLAGS:
                raise FedtextError(f"--{flag.name}{msg[len(key):]}") from None
            if where is not None:
                raise FedtextError(f"{where}: [{'.'.join(path)}] {msg}") from None
        raise FedtextError(f"[{'.'.join(path)}] {msg}" if path else msg) from None


def overrides(*sources: tuple[str, dict]) -> dict[tuple[str, ...], tuple[Any, str, Flag]]:
    """(where, settings) sources -> {field path: (value, where, flag)}, later sources winning.

    A source from a TOML file is nested ({"client": {"lr": 0.5}}, see load_toml); the FLAGS
    source is {flag name: value} ({"client-lr": "0.5"}).
    """
    table = flag_table()
    by_path = {f.path: f for f in table}
    by_flag = {f.name: f for f in table}
    out = {}
    for where, settings in sources:
        if where == FLAGS:
            items = [(by_flag[name], v) for name, v in settings.items()]
        else:
            items = [(by_path[p], v) for p, v in _paths(settings, where, by_path)]
        for flag, value in items:
            out[flag.path] = (coerce(flag, value, where), where, flag)
    return out


def _paths(settings: dict, where: str, by_path: dict, prefix=()):
    """Walk a nested TOML dict into (path, value) pairs, refusing unknown tables and keys."""
    for key, value in settings.items():
        path = prefix + (key,)
        if isinstance(value, dict):
            known = {p[len(path)] for p in by_path if p[:len(path)] == path and len(p) > len(path)}
            if not known:
                siblings = sorted({p[len(prefix)] for p in by_path if p[:len(prefix)] == prefix})
                near = difflib.get_close_matches(key, siblings, n=1)
                hint = f" (did you mean [{'.'.join(prefix + (near[0],))}]?)" if near else ""
                raise FedtextError(f"{where}: unknown table [{'.'.join(path)}]{hint}")
            yield from _paths(value, where, by_path, path)
        elif path in by_path:
            yield path, value
        elif any(p[:len(path)] == path for p in by_path):  # a table name given a value
            raise FedtextError(f"{where}: [{'.'.join(path)}] must be a table of settings, "
                               f"not {value!r}")
        else:
            siblings = sorted({p[len(prefix)] for p in by_path if p[:len(prefix)] == prefix})
            near = difflib.get_close_matches(key, siblings, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            legacy = {f.name: f for f in by_path.values()}.get(key.replace("_", "-"))
            if not prefix and legacy is not None:  # a fedtext 0.1 flat key beside tables
                table = ".".join(legacy.path[:-1])
                hint = (f" (a fedtext 0.1 flat key: write it as {legacy.path[-1]} under "
                        f"[{table}], or make the whole file flat)")
            table = f" in [{'.'.join(prefix)}]" if prefix else ""
            what = "key" if prefix else "top-level key"
            raise FedtextError(f"{where}: unknown {what} {key!r}{table}{hint}")


def merge(cfg: ExperimentConfig, *sources: tuple[str, dict]) -> ExperimentConfig:
    """`cfg` with each source's settings applied in order (later sources win).

    Args:
        cfg: the config so far (the defaults, or a resumed run's saved config).
        sources: (where, settings) pairs: ("configs/tiny.toml", load_toml(...)) or
            (FLAGS, {flag name: value}); `where` names the source in error messages.

    Returns:
        A new ExperimentConfig. Values are checked for type on the way in; each section then
        checks its own settings, and an error names where the offending setting came from.
    """
    values = _nested(cfg)
    origin = {}
    for path, (value, where, flag) in overrides(*sources).items():
        d = values
        for p in path[:-1]:
            d = d[p]
        d[path[-1]] = value
        origin[path] = (where, flag)
    return _build(ExperimentConfig, values, origin)


def conflicts(saved: ExperimentConfig, *sources: tuple[str, dict],
              allowed=RESUMABLE) -> list[str]:
    """What the user asked for that differs from a saved run, except `allowed` settings:
    'key=saved (asked: new)', naming each setting as the user did."""
    saved = saved.resolved()
    out = []
    for path, (value, where, flag) in overrides(*sources).items():
        if any(path[:len(a)] == a for a in allowed):
            continue
        have = saved
        for p in path:
            have = getattr(have, p)
        if have != value:
            key = flag.name.replace("-", "_") if where == FLAGS else ".".join(path)
            out.append(f"{key}={have!r} (asked: {value!r})")
    return out


# ----------------------------------------------------------------------------- TOML


def load_toml(path: str | Path) -> dict:
    """Read a TOML config file into nested settings for `merge` (not yet checked).

    A flat file of fedtext 0.1 (top-level keys named like the flags, `client_lr = 0.5`, or
    inside a `[train]` table) is converted to the nested tables.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedtextError(f"no such config file: {path}") from None
    except IsADirectoryError:
        raise FedtextError(f"config file {path} is a directory") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FedtextError(f"{path}: cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise FedtextError(f"{path}: not valid TOML ({e})") from None
    if set(data) == {"train"} and isinstance(data["train"], dict):
        data = data["train"]
    if any(k not in SECTIONS for k in data) and not any(isinstance(v, dict) for v in data.values()):
        return legacy_to_nested(data, str(path))
    return data


# fedtext 0.1's flat keys whose values meant "the default" (-1) or "off" (0).
_LEGACY_NONE = {"server_momentum": -1, "server_eps": -1, "clip_norm": 0}
_LEGACY_ARCH = {"embed_dim": 256, "hidden_size": 1024, "num_layers": 1, "cell": "gru"}


def legacy_to_nested(flat: dict, where: str) -> dict:
    """A fedtext 0.1 flat config ({"client_lr": 0.5, ...}) as nested tables."""
    by_flag = {f.name: f for f in flag_table()}
    flat = dict(flat)
    for k, none in _LEGACY_NONE.items():
        if flat.get(k) == none:
            del flat[k]
    if flat.get("model", "pretrained") != "scratch":  # 0.1 wrote its default architecture
        for k, v in _LEGACY_ARCH.items():
            if flat.get(k) == v:
                del flat[k]
    out: dict = {}
    for key, value in flat.items():
        flag = by_flag.get(key.replace("_", "-"))
        if flag is None:
            near = difflib.get_close_matches(key.replace("_", "-"), list(by_flag), n=1)
            hint = f" (did you mean {near[0].replace('-', '_')!r}?)" if near else ""
            raise FedtextError(f"{where}: unknown key {key!r}{hint}")
        d = out
        for p in flag.path[:-1]:
            d = d.setdefault(p, {})
        d[flag.path[-1]] = value
    return out


def to_dict(cfg: ExperimentConfig) -> dict:
    """Nested plain dicts for TOML and state files: None left out (0 where 0 means "all"),
    tuples as lists."""
    nested = _nested(cfg)
    for f in flag_table():
        if f.zero_is_none:
            d = nested
            for p in f.path[:-1]:
                d = d[p]
            if d[f.path[-1]] is None:
                d[f.path[-1]] = 0

    def clean(d):
        return {k: clean(v) if isinstance(v, dict) else list(v) if isinstance(v, tuple) else v
                for k, v in d.items() if v is not None}

    return clean(nested)


def from_dict(d: dict, where: str) -> ExperimentConfig:
    """A config saved with to_dict (or fedtext 0.1's flat dict)."""
    if any(k not in SECTIONS for k in d):
        d = legacy_to_nested(d, where)
    return merge(ExperimentConfig(), (where, d))


def to_toml(cfg: ExperimentConfig) -> str:
    return tomli_w.dumps(to_dict(cfg))


def save_toml(cfg: ExperimentConfig, path: str | Path, header: str = "") -> None:
    """Write `cfg` as TOML (atomically), with `header` as leading comment lines."""
    lines = "".join(f"# {h}\n" if h else "#\n" for h in header.splitlines())
    with atomic_path(path) as tmp:
        tmp.write_text(lines + to_toml(cfg), encoding="utf-8")


def load_config(path: str | Path, base: ExperimentConfig | None = None) -> ExperimentConfig:
    """`base` (default: the defaults) overridden by the TOML file at `path`."""
    return merge(base or ExperimentConfig(), (str(path), load_toml(path)))


