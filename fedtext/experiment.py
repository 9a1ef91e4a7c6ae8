"""The experiment loop: rounds of a FederatedAlgorithm, evaluation, metrics, checkpoint/resume.

    run_rounds(algorithm, state, sampler, client_data, rounds, evaluate=..., on_round=...)

is FedJAX's `run_federated_experiment` in miniature: each round samples its clients (a pure
function of (seed, round)), builds their data, applies the algorithm, evaluates every
`eval_every` rounds and hands (state, metrics row) to `on_round`, which writes the row
(metrics.jsonl + TensorBoard) and then the whole state, atomically. `train(cfg, out)` wires a
TrainConfig to it and owns the run directory:

    RUN/config.toml     the effective config          RUN/metrics.jsonl   one row per round
    RUN/state.pt        ServerState + RNGs (resume)   RUN/tb/             TensorBoard events
    RUN/final/          the trained model, a checkpoint for `fedtext evaluate` / `generate`

Resume is exact: the state holds everything a round reads (params, server optimizer and
aggregator states, the round number, which also fixes the sampler's position; the RNG states),
and the row of a round is written before its state, so a run killed anywhere redoes at most
the round it was in, with the same clients and seeds, and ends with bit-identical weights.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fedtext import aggregators, gru, server_optimizers
from fedtext.batching import client_batches
from fedtext.client import ClientConfig, cached_model, load_params
from fedtext.config import TrainConfig, differences, merge, save_toml
from fedtext.errors import FedtextError
from fedtext.fedavg import FederatedAlgorithm, ServerState, fed_avg
from fedtext.model import CharRNN, ModelConfig
from fedtext.paths import atomic_path, atomic_write_text
from fedtext.sampling import FixedSampler, UniformSampler, WeightedSampler

STATE_FILE, METRICS_FILE, CONFIG_FILE = "state.pt", "metrics.jsonl", "config.toml"
FINAL_DIR, TB_DIR = "final", "tb"
EVAL_ROWS = 256  # rows per eval forward pass: big matmuls, and (256, 100, 88) logits are 9 MB
_EVAL_SAMPLE_TAG = 2  # SeedSequence word: the eval sample never shares the sampler's stream


# ----------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvalSet:
    """Held-out rows of some clients, built once, scored every eval round in one pass."""

    x: torch.Tensor  # (N, T) int64 inputs; every row has at least one counted target
    y: torch.Tensor  # (N, T) int64 targets
    mask: torch.Tensor  # (N, T) bool, True where the target counts
    client: torch.Tensor  # (N,) int64: the row's position in client_ids
    client_ids: tuple[str, ...]

    @property
    def chars(self) -> int:
        return int(self.mask.sum())


def build_eval_set(store, client_ids: Sequence[str], batch_size: int = 8,
                   seq_len: int = 100) -> EvalSet:
    """The clients' text in padded batches (nothing dropped), restacked into one array."""
    xs, ys, ms, cs = [], [], [], []
    for i, cid in enumerate(client_ids):
        for b in client_batches(store.chars(cid), batch_size=batch_size, seq_len=seq_len,
                                mode="padded"):
            keep = b.mask.any(dim=1)  # the all-padding rows that fill a last batch: no targets
            xs.append(b.x[keep]), ys.append(b.y[keep]), ms.append(b.mask[keep])
            cs.append(torch.full((int(keep.sum()),), i, dtype=torch.int64))
    if not xs:
        raise FedtextError("the evaluation clients hold no text to score")
    return EvalSet(torch.cat(xs), torch.cat(ys), torch.cat(ms), torch.cat(cs), tuple(client_ids))


def eval_sample(store, n: int, seed: int) -> list[str]:
    """A fixed, seeded sample of n clients that have a target (all of them for n = 0)."""
    sizes = np.asarray(store.chars_per_client)
    ok = np.flatnonzero(sizes >= 2)  # one char is an input with no target
    if n and n < len(ok):
        rng = np.random.default_rng(np.random.SeedSequence([seed, _EVAL_SAMPLE_TAG]))
        ok = np.sort(rng.choice(ok, size=n, replace=False))  # store order, for reading
    return [store.client_ids[i] for i in ok]


@torch.no_grad()
def evaluate_eval_set(model: CharRNN, es: EvalSet, rows: int = EVAL_ROWS,
                      progress: bool = False) -> dict:
    """Pooled and per-client loss / accuracy of `model` on `es`, in one pass.

    Returns:
        eval_loss / eval_accuracy pooled over counted targets (every character weighs the
        same, as Keras' evaluate), eval_chars, eval_clients, and over clients (each weighs the
        same): eval_unweighted_loss / _accuracy and eval_accuracy_p10 / p50 / p90.
    """
    n = len(es.client_ids)
    sums = torch.zeros(3, n, dtype=torch.float64)  # loss_sum, correct, count per client
    was_training = model.training
    model.eval()
    for i in tqdm(range(0, len(es.x), rows), desc="eval", unit="chunk", leave=False,
                  disable=not progress):
        x, y, m = es.x[i:i + rows], es.y[i:i + rows], es.mask[i:i + rows]
        logits, _ = model.run(x)  # (b, T, V), every row from a zero state
        V = logits.size(-1)
        nll = F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1),
                              reduction="none").view_as(m)  # (b, T)
        per_row = torch.stack([(nll * m).sum(1), ((logits.argmax(-1) == y) & m).sum(1),
                               m.sum(1)]).double()  # (3, b)
        sums.index_add_(1, es.client[i:i + rows], per_row)
    model.train(was_training)
    loss_sum, correct, count = sums.sum(1).tolist()
    scored = sums[2] > 0
    c_loss, c_acc = (sums[0] / sums[2])[scored].numpy(), (sums[1] / sums[2])[scored].numpy()
    p10, p50, p90 = np.percentile(c_acc, [10, 50, 90]).tolist()
    return {"eval_loss": loss_sum / count, "eval_accuracy": correct / count,
            "eval_chars": int(count), "eval_clients": n,
            "eval_unweighted_loss": float(c_loss.mean()),
            "eval_unweighted_accuracy": float(c_acc.mean()),
            "eval_accuracy_p10": p10, "eval_accuracy_p50": p50, "eval_accuracy_p90": p90}


# ----------------------------------------------------------------------------- the round loop


class ProgressBackend:
    """SequentialBackend that reports every finished client (to drive the progress bar)."""

    def __init__(self):
        self.on_result: Callable | None = None

    def map(self, fn: Callable, jobs: Sequence[dict], shared: dict | None = None) -> list:
        results = []
        for job in jobs:
            results.append(fn(**(shared or {}), **job))
            if self.on_result is not None:
                self.on_result(results[-1])
        return results


def run_rounds(algorithm: FederatedAlgorithm, state: ServerState, sampler,
               client_data: Callable[[str], object], rounds: int, *,
               evaluate: Callable[[dict], dict] | None = None, eval_every: int = 1,
               on_round: Callable[[ServerState, dict], None] | None = None,
               backend: ProgressBackend | None = None, progress: bool = True,
               log: Callable[[str], None] | None = None) -> ServerState:
    """Run rounds state.round + 1 .. `rounds` and return the final state.

    Args:
        algorithm: what a round does (fed_avg(...)).
        state: where to start (algorithm.init(params), or a resumed state).
        sampler: .sample(round) -> client ids (fedtext.sampling).
        client_data: client id -> its ClientData (batches, or a callable (epoch, seed)).
        rounds: the last round to run.
        evaluate: params -> dict of eval metrics, run every `eval_every` rounds and last.
        on_round: called with (state, row) after every round: log and checkpoint there.
        backend: the algorithm's ProgressBackend, if it has one: per-client progress.
        progress: show a tqdm bar per round (clients done, loss, chars/s, ETA).
        log: one-line messages (default: tqdm.write).
    """
    log = log or tqdm.write
    t_start, done_start = time.perf_counter(), state.round
    while state.round < rounds:
        r = state.round  # rounds done so far; this is round r + 1
        t0 = time.perf_counter()
        ids = sampler.sample(r)
        clients = [(cid, client_data(cid)) for cid in ids]
        bar = tqdm(total=len(clients), desc=f"round {r + 1}/{rounds}", unit="client",
                   leave=False, disable=not progress, dynamic_ncols=True)
        run = {"loss": 0.0, "count": 0}

        def on_result(res, bar=bar, run=run, t0=t0):  # one client finished
            run["loss"] += res.metrics["loss_sum"]
            run["count"] += res.metrics["count"]
            bar.update(1)
            if run["count"]:
                bar.set_postfix(loss=f"{run['loss'] / run['count']:.3f}",
                                chars_s=f"{run['count'] / (time.perf_counter() - t0):,.0f}",
                                refresh=False)

        if backend is not None:
            backend.on_result = on_result
        try:
            state, m = algorithm.apply(state, clients)
        finally:
            bar.close()
            if backend is not None:
                backend.on_result = None
        t1 = time.perf_counter()
        row = {"round": state.round, "clients": m["clients"], "client_ids": list(ids),
               "train_loss": m["train_loss"], "train_accuracy": m["train_accuracy"],
               "chars": m["chars"], "batches": m["num_batches"],
               "delta_norm": m["delta_norm"], "train_seconds": t1 - t0,
               "chars_per_s": m["chars"] / (t1 - t0)}
        if evaluate is not None and (state.round % eval_every == 0 or state.round == rounds):
            row.update(evaluate(state.params))
            row["eval_seconds"] = time.perf_counter() - t1
        row["seconds"] = time.perf_counter() - t0
        if on_round is not None:
            on_round(state, row)
        per_round = (time.perf_counter() - t_start) / (state.round - done_start)
        log(format_row(row) + f"  (eta {_hms(per_round * (rounds - state.round))})")
    return state


def format_row(row: dict) -> str:
    """One metrics row as a short log line."""
    parts = [f"round {row['round']}"]
    if row.get("clients"):
        parts.append(f"train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}")
    if row.get("eval_loss") is not None:
        parts.append(f"eval loss {row['eval_loss']:.4f} acc {row['eval_accuracy']:.4f}")
    if row.get("clients"):
        parts.append(f"{row['seconds']:.1f}s, {row['chars_per_s']:,.0f} chars/s")
    return "  ".join(parts)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


# ----------------------------------------------------------------------------- state files


def _plain(x):
    """NamedTuples -> dicts, recursively: what torch.load(weights_only=True) can read back."""
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return {f: _plain(getattr(x, f)) for f in x._fields}
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def _restore(template, plain, where: str = "state"):
    """Rebuild the types of `template` (a fresh algorithm.init state) around saved values."""
    def bad():
        return FedtextError(f"{STATE_FILE}: {where} does not fit this run's algorithm")

    if isinstance(template, tuple) and hasattr(template, "_fields"):
        if not isinstance(plain, dict) or set(plain) != set(template._fields):
            raise bad()
        return type(template)(**{f: _restore(getattr(template, f), plain[f], f"{where}.{f}")
                                 for f in template._fields})
    if isinstance(template, dict):
        if not isinstance(plain, dict) or set(plain) != set(template):
            raise bad()
        return {k: _restore(v, plain[k], f"{where}.{k}") for k, v in template.items()}
    if isinstance(template, list | tuple):
        if not isinstance(plain, list | tuple) or len(plain) != len(template):
            raise bad()
        return type(template)(_restore(t, p, where) for t, p in zip(template, plain))
    if isinstance(template, torch.Tensor):
        if not isinstance(plain, torch.Tensor) or plain.shape != template.shape:
            raise bad()
        return plain.to(template.dtype)
    if (template is None) != (plain is None):
        raise bad()
    return plain


def save_state(path: Path, state: ServerState, extra: dict) -> None:
    """torch.save {server state, RNG states, extra} to `path` atomically (temp + rename)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    payload = {"server_state": _plain(state), "torch_rng": torch.get_rng_state(),
               "numpy_rng": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                             gauss], **extra}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
        _umask_mode(tmp)


def _umask_mode(path: Path) -> None:
    """Give a temp file (mkstemp makes them 0600) the permissions of an ordinary new file."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def load_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FedtextError(f"--resume: {path.parent} holds no run ({STATE_FILE} missing); "
                           "start it without --resume") from None
    except Exception as e:  # a foreign or damaged file
        raise FedtextError(f"--resume: cannot read {path}: {' '.join(str(e).split())}") from None


def _json(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


class RunRecorder:
    """Writes a run directory's metrics.jsonl, TensorBoard events and state.pt, in that order."""

    def __init__(self, out: Path, extra: Callable[[], dict], start_round: int = 0,
                 tensorboard: bool = True):
        self.out, self.extra = Path(out), extra
        self.metrics = self.out / METRICS_FILE
        _trim_metrics(self.metrics, start_round)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when used

            # purge_step drops the events a killed run logged after its last saved round.
            self.tb = SummaryWriter(str(self.out / TB_DIR), purge_step=start_round + 1)

    def rows(self) -> list[dict]:
        return read_metrics(self.metrics)

    def log_row(self, row: dict) -> None:
        with self.metrics.open("a", encoding="utf-8") as f:
            f.write(json.dumps({k: _json(v) for k, v in row.items()}) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "round" and isinstance(v, int | float) and math.isfinite(v):
                    group = "eval" if k.startswith("eval_") else "train"
                    self.tb.add_scalar(f"{group}/{k.removeprefix('eval_')}", v, row["round"])
            self.tb.flush()

    def save(self, state: ServerState) -> None:
        save_state(self.out / STATE_FILE, state, self.extra())

    def __call__(self, state: ServerState, row: dict) -> None:
        self.log_row(row)  # first the row, then the state: resume trims rows past the state
        self.save(state)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl (an unfinished last line, from a kill, is skipped)."""
    if not Path(path).exists():
        return []
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _trim_metrics(path: Path, last_round: int) -> None:
    rows = [r for r in read_metrics(path) if r["round"] <= last_round]
    if path.exists():
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------- wiring a config


def load_initial_model(spec: str, cfg: TrainConfig) -> CharRNN:
    """--model: "pretrained", "scratch" (seeded init of the config's architecture), a
    checkpoint directory, or a train/pretrain run directory (its final/ or model/)."""
    from fedtext.checkpoint import load_checkpoint, resolve_model_spec

    if spec == "scratch":
        mc = ModelConfig(embed_dim=cfg.embed_dim, hidden_size=cfg.hidden_size,
                         num_layers=cfg.num_layers, cell=cfg.cell)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return CharRNN(mc)
    try:
        model, _ = load_checkpoint(resolve_model_spec(spec))
    except FedtextError as e:
        if spec != "pretrained":
            raise
        raise FedtextError(f"{e}; pass --model CHECKPOINT (from `fedtext pretrain` or "
                           "`fedtext convert-keras`) or --model scratch") from None
    return model


def build_algorithm(cfg: TrainConfig, model_config: ModelConfig,
                    backend=None) -> FederatedAlgorithm:
    """fed_avg with the client work, server optimizer, aggregator and weighting of `cfg`."""
    c = cfg.resolved()
    client = ClientConfig(model=model_config, local_epochs=c.local_epochs,
                          max_batches=c.max_batches or None, optimizer=c.client_optimizer,
                          lr=c.client_lr, momentum=c.client_momentum, mu=c.prox_mu)
    if c.server_optimizer in ("sgd", "sgdm"):
        server = server_optimizers.sgd(c.server_lr, momentum=c.server_momentum)
    elif c.server_optimizer == "adagrad":
        server = server_optimizers.adagrad(c.server_lr, eps=c.server_eps)
    else:
        server = server_optimizers.SERVER_OPTIMIZERS[c.server_optimizer](
            c.server_lr, b1=c.server_b1, b2=c.server_b2, eps=c.server_eps)
    agg = aggregators.clipped_mean(c.clip_norm) if c.clip_norm else aggregators.mean()
    return fed_avg(client, server, agg, c.weighting, backend, seed=c.seed)


def client_epoch_batches(ids: np.ndarray, epoch: int, seed: int, *, batch_size: int,
                         seq_len: int, mode: str, shuffle: bool,
                         max_batches: int | None) -> list:
    """One client's batches for one local epoch: `partial(client_epoch_batches, ids, **opts)`
    is the (epoch, seed) -> batches ClientData of client_update, and it pickles."""
    return client_batches(ids, batch_size=batch_size, seq_len=seq_len, mode=mode,
                          shuffle_seed=seed + epoch if shuffle else None, max_batches=max_batches)


def _min_chars(cfg: TrainConfig) -> int:
    """Characters a client needs for one batch: a full one, or one target when padding."""
    return (cfg.seq_len + 1) * cfg.batch_size if cfg.drop_remainder else 2


def build_sampler(cfg: TrainConfig, store):
    """FixedSampler for cfg.clients, else uniform / weighted over clients with a batch."""
    sizes = np.asarray(store.chars_per_client)
    need = _min_chars(cfg)
    if cfg.clients:
        for cid in cfg.clients:
            n = store.num_chars(cid)  # raises on an unknown id, with suggestions
            if n < need:
                raise FedtextError(f"client {cid} has {n} train chars: no batch of "
                                   f"{cfg.batch_size}x{cfg.seq_len} without padding (needs "
                                   f"{need}); drop --drop-remainder or pick another client")
        return FixedSampler(list(cfg.clients))
    ok = np.flatnonzero(sizes >= need)
    ids = [store.client_ids[i] for i in ok]
    if cfg.clients_per_round > len(ids):
        raise FedtextError(f"clients_per_round {cfg.clients_per_round} > the {len(ids)} "
                           f"train clients with a batch of {cfg.batch_size}x{cfg.seq_len}")
    if cfg.sampling == "weighted":
        return WeightedSampler(ids, cfg.clients_per_round, sizes[ok].tolist(), cfg.seed)
    return UniformSampler(ids, cfg.clients_per_round, cfg.seed)


def load_data(cfg: TrainConfig, cache_dir=None):
    from fedtext.data import load_dataset

    return load_dataset(None if cfg.data == "shakespeare" else cfg.data, cache_dir=cache_dir)


def data_summary(ds) -> dict:
    """What resume checks: the same clients and amount of text."""
    return {"name": ds.name, "train_clients": len(ds.train), "train_chars": ds.train.total_chars,
            "test_clients": len(ds.test), "test_chars": ds.test.total_chars}


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """cfg with a model or data path made absolute: the saved config works from anywhere."""
    changes = {k: str(Path(v).expanduser().resolve()) for k, v in
               (("model", cfg.model), ("data", cfg.data))
               if v not in ("pretrained", "scratch", "shakespeare") and Path(v).exists()}
    return replace(cfg, **changes)


def run_is_started(out: Path) -> bool:
    return (out / STATE_FILE).exists()


@dataclass
class TrainResult:
    state: ServerState  # the final server state
    rows: list[dict]  # every metrics row, round 0 first
    out: Path  # the run directory
    model: CharRNN  # the trained model (also in out/final)
    eval_set: EvalSet | None  # what eval_* was measured on


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False,
          overrides: Sequence[tuple[str, dict]] = (), model: CharRNN | None = None,
          dataset=None, cache_dir=None, until_round: int | None = None,
          progress: bool = True, tensorboard: bool = True, command: str = "",
          log: Callable[[str], None] = print) -> TrainResult:
    """Run (or resume) a federated training run into the directory `out`.

    Args:
        cfg: the config (defaults < TOML < flags, merged by the caller).
        out: the run directory; must be new or empty unless `resume`.
        resume: continue the run in `out`. Its saved config is the base and `overrides`
            (the (where, dict) sources that made `cfg`) go on top; only RESUMABLE fields may
            differ from what the run was started with.
        model: the initial model, if already loaded (else from cfg.model).
        dataset: a FederatedDataset, if already loaded (else from cfg.data).
        until_round: stop after this round, as if killed there (for tests and slices).
        progress, tensorboard: per-round bars; TensorBoard events under out/tb.
        command: the command line, for the final checkpoint's provenance.
        log: where one-line messages go.

    Returns:
        TrainResult(state, rows, out, model, eval_set).
    """
    out = Path(out)
    saved = None
    if resume:
        saved = load_state(out / STATE_FILE)
        try:
            base = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in saved["config"].items()})
        except (TypeError, FedtextError) as e:
            raise FedtextError(f"{out / STATE_FILE}: unreadable config ({e})") from None
        cfg = absolute_paths(merge(base, *overrides))
        diff = differences(base, cfg)
        if diff:
            raise FedtextError(f"--resume: {out} was started with " + ", ".join(diff)
                               + "; only rounds and eval_every may change (or use another --out)")
    elif run_is_started(out):
        done = read_metrics(out / METRICS_FILE)
        at = done[-1]["round"] if done else 0
        raise FedtextError(f"{out} already holds a run (round {at}); pass --resume to continue "
                           "it (with --rounds N to extend it) or choose another --out")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FedtextError(f"{out} exists and is not an empty directory; choose another --out")
    cfg = absolute_paths(cfg).resolved()

    ds = dataset if dataset is not None else load_data(cfg, cache_dir)
    summary = data_summary(ds)
    if saved is not None and saved["data"] != summary:
        raise FedtextError(f"--resume: the data differs from the run's ({saved['data']} vs "
                           f"{summary}); use the same --data")
    sampler = build_sampler(cfg, ds.train)
    if cfg.eval_client_ids:
        eval_ids = list(cfg.eval_client_ids)
        for cid in eval_ids:
            ds.test.index(cid)  # unknown ids: a FedtextError with suggestions
    else:
        eval_ids = eval_sample(ds.test, cfg.eval_clients, cfg.seed)
    eval_set = build_eval_set(ds.test, eval_ids, cfg.batch_size, cfg.seq_len)

    if saved is not None:
        model_config = ModelConfig(**saved["model_config"])
    else:
        model = model if model is not None else load_initial_model(cfg.model, cfg)
        model_config = model.config
    backend = ProgressBackend()
    algorithm = build_algorithm(cfg, model_config, backend)
    if saved is not None:
        # A fresh init state is the template of types (NamedTuples) the saved values fill.
        template = algorithm.init(saved["server_state"]["params"])
        state = _restore(template, saved["server_state"])
        torch.set_rng_state(saved["torch_rng"])
        name, keys, *rest = saved["numpy_rng"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        log(f"resuming {out} after round {state.round} of {cfg.rounds}")
    else:
        state = algorithm.init({k: v.detach() for k, v in model.state_dict().items()})

    mode = "drop_remainder" if cfg.drop_remainder else "padded"
    opts = {"batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "mode": mode,
            "shuffle": cfg.shuffle, "max_batches": cfg.max_batches or None}

    def client_data(cid):  # built lazily, in the client job: only its first batches
        return functools.partial(client_epoch_batches, ds.train.chars(cid), **opts)

    eval_model = cached_model(model_config)

    def evaluate(params):
        load_params(eval_model, params)
        return evaluate_eval_set(eval_model, eval_set, progress=progress)

    out.mkdir(parents=True, exist_ok=True)
    save_toml(cfg, out / CONFIG_FILE, header="fedtext train: the effective configuration of "
              "this run (flags > --config TOML > defaults).\n`fedtext train --config "
              f"{out / CONFIG_FILE} --out NEW` repeats it.")

    def extra() -> dict:  # saved beside the server state: what resume checks against
        return {"config": cfg.to_dict(), "model_config": model_config.to_dict(),
                "data": summary, "eval_client_ids": eval_ids}

    recorder = RunRecorder(out, extra, state.round, tensorboard)
    last_precision = gru.get_precision()
    gru.set_precision(cfg.precision)
    try:
        if saved is None:
            recorder.save(state)  # from here on, --resume works
        if not any(r["round"] == state.round for r in recorder.rows()) and state.round == 0:
            t0 = time.perf_counter()
            row = {"round": 0, "clients": 0, "chars": 0, **evaluate(state.params)}
            row["seconds"] = row["eval_seconds"] = time.perf_counter() - t0
            recorder.log_row(row)
            log(format_row(row) + f"  (before training; eval on {len(eval_ids)} test clients, "
                f"{eval_set.chars:,} chars)")
        stop = cfg.rounds if until_round is None else min(until_round, cfg.rounds)
        state = run_rounds(algorithm, state, sampler, client_data, stop, evaluate=evaluate,
                           eval_every=cfg.eval_every, on_round=recorder, backend=backend,
                           progress=progress, log=log)
    finally:
        recorder.close()
        gru.set_precision(last_precision)

    final = CharRNN(model_config)
    final.load_state_dict(state.params)
    rows = recorder.rows()
    if state.round >= cfg.rounds:
        from fedtext.checkpoint import save_checkpoint

        last_eval = next((r for r in reversed(rows) if r.get("eval_loss") is not None), {})
        save_checkpoint(out / FINAL_DIR, final, provenance={
            "kind": "federated", "base_model": cfg.model, "data": summary["name"],
            "rounds": state.round, "command": command, "seed": cfg.seed,
            "config": cfg.to_dict(), "eval_loss": last_eval.get("eval_loss"),
            "eval_accuracy": last_eval.get("eval_accuracy"),
        })
    return TrainResult(state, rows, out, final.eval(), eval_set)
