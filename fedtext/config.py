"""The settings of a federated training run: one frozen dataclass, TOML in, TOML out.

    cfg = TrainConfig()                                    # the tutorial's defaults
    cfg = merge(cfg, ("configs/tiny.toml", load_toml("configs/tiny.toml")),
                ("command line", {"rounds": 10}))         # flags override TOML
    save_toml(cfg, "runs/x/config.toml")                   # what the run really used

Precedence is defaults < TOML file < command-line flags (and, on --resume, the run's own saved
config sits just above the defaults). Every key of the TOML file is a field name below; the
flag is the same name with dashes (`client_lr` <-> `--client-lr`). A key that is not a field,
or a value of the wrong type or out of range, is a FedtextError naming the file (or flag) and
the key. TOML has no null, so "no limit" is spelled 0 (`max_batches = 0`, `eval_clients = 0`)
and "no list" is an empty list (`clients = []`).
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import tomli_w

from fedtext.errors import FedtextError
from fedtext.paths import atomic_path

SERVER_OPTIMIZERS = ("sgd", "sgdm", "adam", "yogi", "adagrad")
# The server eps / tau each optimizer uses unless told (TFF's defaults, see server_optimizers).
SERVER_EPS = {"adam": 1e-7, "yogi": 1e-3, "adagrad": 1e-7}
ARCH_FIELDS = ("embed_dim", "hidden_size", "num_layers", "cell")  # used by model = "scratch"
# Fields a resumed run may change: they decide how long it runs and how often it evaluates,
# never what a finished round computed.
RESUMABLE = ("rounds", "eval_every")
FLAGS = "command line"  # the `where` of command-line overrides (errors name the flag)


@dataclass(frozen=True)
class TrainConfig:
    # --- where from
    model: str = "pretrained"  # the shipped pre-trained model (the tutorial starts from one)
    data: str = "shakespeare"  # federated Shakespeare; or a user folder/file (load_text_clients)
    # --- rounds and clients
    rounds: int = 5  # the tutorial's NUM_ROUNDS
    clients_per_round: int = 10  # sampled at random each round (the tutorial's extension idea)
    clients: tuple[str, ...] = ()  # fixed client ids every round instead of sampling
    sampling: str = "uniform"  # "uniform", or "weighted" by characters per client
    weighting: str = "tokens"  # = TFF's NUM_EXAMPLES when batches are full; fair when padded
    # --- local training (client work)
    local_epochs: int = 1  # the tutorial: one pass
    max_batches: int = 5  # the tutorial's .take(5); 0 = all of a client's batches
    batch_size: int = 8  # the tutorial's BATCH_SIZE
    seq_len: int = 100  # the tutorial's SEQ_LENGTH
    drop_remainder: bool = False  # pad + mask instead, so small clients still take part
    shuffle: bool = True  # shuffle a client's sequences each epoch (the tutorial's .shuffle)
    client_optimizer: str = "sgd"  # the tutorial's SGD
    client_lr: float = 0.5  # the tutorial's SGD(lr=0.5)
    client_momentum: float = 0.0  # sgd only
    prox_mu: float = 0.0  # FedProx proximal term; 0 = FedAvg
    # --- server
    server_optimizer: str = "sgd"  # sgd with lr 1 = plain FedAvg (TFF's default server)
    server_lr: float = 1.0  # FedAvg: the new model is the weighted mean of the client models
    server_momentum: float = -1.0  # -1 = the optimizer's default: 0.9 for sgdm, 0 for sgd
    server_b1: float = 0.9  # adam/yogi beta_1 (Reddi et al.)
    server_b2: float = 0.999  # adam/yogi beta_2
    server_eps: float = -1.0  # -1 = the optimizer's default (TFF's: adam 1e-7, yogi 1e-3, ...)
    clip_norm: float = 0.0  # clip each client delta to this L2 norm first; 0 = no clipping
    # --- evaluation
    eval_every: int = 1  # central evaluation every N rounds (and always after the last)
    eval_clients: int = 0  # a fixed seeded sample of N test clients; 0 = all of them
    eval_client_ids: tuple[str, ...] = ()  # or exactly these test clients
    # --- the rest
    seed: int = 0  # client sampling, shuffling, eval sample, scratch init
    precision: str = "fp32"  # "bf16": the GRU's recurrent matmuls in bfloat16
    # --- architecture, for model = "scratch" only (defaults: the tutorial's model)
    embed_dim: int = 256
    hidden_size: int = 1024
    num_layers: int = 1
    cell: str = "gru"

    def __post_init__(self):
        for name in fields(self):
            check_field(name.name, getattr(self, name.name))
        if self.model != "scratch":
            default = {f.name: f.default for f in fields(self)}
            changed = [f for f in ARCH_FIELDS if getattr(self, f) != default[f]]
            if changed:
                raise FedtextError(f"{', '.join(changed)} describe a new model: they need "
                                   f"model = 'scratch' (model is {self.model!r})")
        if self.server_momentum > 0 and self.server_optimizer not in ("sgd", "sgdm"):
            raise FedtextError(f"server_momentum needs server_optimizer sgd or sgdm, "
                               f"not {self.server_optimizer!r}")
        if self.client_momentum and self.client_optimizer != "sgd":
            raise FedtextError("client_momentum needs client_optimizer = 'sgd'")
        if self.eval_clients and self.eval_client_ids:
            raise FedtextError("give eval_clients (a sample size) or eval_client_ids, not both")

    def resolved(self) -> TrainConfig:
        """The same config with the optimizer defaults (-1) replaced by their values."""
        mom = self.server_momentum
        if mom < 0:
            mom = 0.9 if self.server_optimizer == "sgdm" else 0.0
        eps = self.server_eps
        if eps < 0:
            eps = SERVER_EPS.get(self.server_optimizer, 0.0)
        return replace(self, server_momentum=mom, server_eps=eps)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


_CHOICES = {
    "sampling": ("uniform", "weighted"),
    "weighting": ("tokens", "examples", "uniform"),
    "client_optimizer": ("sgd", "adam", "adagrad"),
    "server_optimizer": SERVER_OPTIMIZERS,
    "precision": ("fp32", "bf16"),
    "cell": ("gru", "lstm"),
}
_AT_LEAST_1 = ("rounds", "clients_per_round", "local_epochs", "batch_size", "seq_len",
               "eval_every", "embed_dim", "hidden_size", "num_layers")
_AT_LEAST_0 = ("max_batches", "eval_clients", "seed", "client_momentum", "prox_mu",
               "clip_norm")
_POSITIVE = ("client_lr", "server_lr")


def check_field(name: str, value) -> None:
    """Range and choice checks of one field; raises FedtextError('<name> must ...')."""
    if name in _CHOICES and value not in _CHOICES[name]:
        raise FedtextError(f"{name} must be one of {', '.join(_CHOICES[name])}, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise FedtextError(f"{name} must be a finite number, not {value}")
    if name in _AT_LEAST_1 and value < 1:
        raise FedtextError(f"{name} must be >= 1, not {value}")
    if name in _AT_LEAST_0 and value < 0:
        raise FedtextError(f"{name} must be >= 0, not {value}")
    if name in _POSITIVE and not value > 0:
        raise FedtextError(f"{name} must be > 0, not {value}")
    if name == "client_momentum" and value >= 1:
        raise FedtextError(f"client_momentum must be in [0, 1), not {value}")
    if name in ("server_momentum", "server_eps") and value < 0 and value != -1:
        raise FedtextError(f"{name} must be >= 0 (or -1 for the optimizer's default), "
                           f"not {value}")
    if name in ("server_b1", "server_b2") and not 0 <= value < 1:
        raise FedtextError(f"{name} must be in [0, 1), not {value}")
    if name in ("model", "data") and not value:
        raise FedtextError(f"{name} must not be empty")
    if name in ("clients", "eval_client_ids") and len(set(value)) != len(value):
        raise FedtextError(f"{name} lists a client twice")


_TYPES = typing.get_type_hints(TrainConfig)


def _coerce(name: str, value, where: str):
    """`value` as the type of field `name`, or a FedtextError naming `where` and the key."""
    want = _TYPES[name]

    def bad():
        kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
        return FedtextError(f"{where}: {name} must be "
                            f"{kind.get(want, 'a list of strings')}, not {value!r}")

    if want is bool:
        if not isinstance(value, bool):
            raise bad()
    elif want is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
    elif want is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad()
        value = float(value)
    elif want is str:
        if not isinstance(value, str):
            raise bad()
    else:  # tuple[str, ...]: a TOML list, or "a,b,c" from the command line
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise bad()
        value = tuple(value)
    return value


def merge(cfg: TrainConfig, *sources: tuple[str, dict]) -> TrainConfig:
    """`cfg` with each source's overrides applied in order (later sources win).

    Args:
        cfg: the config so far.
        sources: (where, {field name: value}) pairs, e.g. ("configs/tiny.toml", toml_dict),
            ("command line", flags); `where` names the source in error messages.

    Returns:
        A new TrainConfig. Each key is checked on its own first (errors name the source and
        key); settings that do not go together are checked once all sources are in.
    """
    known = {f.name for f in fields(TrainConfig)}
    changes = {}
    for where, overrides in sources:
        for key, value in overrides.items():
            if key not in known:
                near = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise FedtextError(f"{where}: unknown key {key!r}{hint}")
            value = _coerce(key, value, where)
            try:
                check_field(key, value)
            except FedtextError as e:
                if where == FLAGS:  # name the flag the user typed: --client-lr, not client_lr
                    raise FedtextError(f"--{key.replace('_', '-')}{str(e)[len(key):]}") from None
                raise FedtextError(f"{where}: {e}") from None
            changes[key] = value
    return replace(cfg, **changes)


def load_toml(path: str | Path) -> dict:
    """Read a TOML config file into a dict of overrides (not yet checked; see merge).

    A `[train]` table is accepted as well as top-level keys.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedtextError(f"no such config file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FedtextError(f"{path}: cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise FedtextError(f"{path}: not valid TOML ({e})") from None
    if set(data) == {"train"} and isinstance(data["train"], dict):
        data = data["train"]
    return data


def load_config(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    """`base` (default: the defaults) overridden by the TOML file at `path`."""
    return merge(base or TrainConfig(), (str(path), load_toml(path)))


def to_toml(cfg: TrainConfig) -> str:
    return tomli_w.dumps(cfg.to_dict())


def save_toml(cfg: TrainConfig, path: str | Path, header: str = "") -> None:
    """Write `cfg` as TOML (atomically), with `header` as leading comment lines."""
    lines = "".join(f"# {h}\n" if h else "#\n" for h in header.splitlines())
    with atomic_path(path) as tmp:
        tmp.write_text(lines + to_toml(cfg), encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> an ordinary file


def differences(saved: TrainConfig, asked: TrainConfig,
                allowed: tuple[str, ...] = RESUMABLE) -> list[str]:
    """'key=saved (asked: new)' for every field that differs, except `allowed` ones."""
    a, b = saved.resolved(), asked.resolved()
    return [f"{f.name}={getattr(a, f.name)!r} (asked: {getattr(b, f.name)!r})"
            for f in fields(TrainConfig)
            if f.name not in allowed and getattr(a, f.name) != getattr(b, f.name)]
