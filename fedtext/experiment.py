"""The experiment loop: rounds of a FederatedAlgorithm, evaluation, metrics, checkpoint/resume.

    state = run_rounds(algorithm, state, sampler, client_data, rounds,
                       evaluate=..., on_round=RunRecorder(out, ...))

is FedJAX's `run_federated_experiment` in miniature: each round samples its clients (a pure
function of (seed, round)), builds their data, applies the algorithm, evaluates every
`eval_every` rounds and hands (state, metrics row) to `on_round`. `RunRecorder` writes the row
(RUN/metrics.jsonl + TensorBoard events in RUN/tb/) and then the whole state (RUN/state.pt),
atomically. fedtext.trainer wires a TrainConfig to all this (`fedtext train`).

Resume is exact: the state holds everything a round reads (params, server optimizer and
aggregator states, the round number, which also fixes the sampler's position; the RNG states),
and the row of a round is written before its state, so a run killed anywhere redoes at most
the round it was in, with the same clients and seeds, and ends with bit-identical weights.

Held-out evaluation (`EvalSet`) restacks the test clients' padded rows once into one array
with a client index per row, so each eval is a few large forward passes that yield pooled and
per-client numbers together.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fedtext.batching import client_batches
from fedtext.errors import FedtextError
from fedtext.fedavg import FederatedAlgorithm, ServerState
from fedtext.model import CharRNN
from fedtext.paths import atomic_path, atomic_write_text

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
               log: Callable[[str], None] | None = None,
               until: int | None = None) -> ServerState:
    """Run rounds state.round + 1 .. `rounds` and return the final state.

    Args:
        algorithm: what a round does (fed_avg(...)).
        state: where to start (algorithm.init(params), or a resumed state).
        sampler: .sample(round) -> client ids (fedtext.sampling).
        client_data: client id -> its ClientData (batches, or a callable (epoch, seed)).
        rounds: the run's last round (the last round is always evaluated).
        evaluate: params -> dict of eval metrics, run every `eval_every` rounds and last.
        on_round: called with (state, row) after every round: log and checkpoint there.
        backend: the algorithm's ProgressBackend, if it has one: per-client progress.
        progress: show a tqdm bar per round (clients done, loss, chars/s, ETA).
        log: one-line messages (default: tqdm.write).
        until: stop after this round instead, as if interrupted there.
    """
    log = log or tqdm.write
    t_start, done_start = time.perf_counter(), state.round
    stop = rounds if until is None else min(until, rounds)
    while state.round < stop:
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
        log(format_row(row) + f"  (eta {_hms(per_round * (stop - state.round))})")
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


def restore_state(template, plain, where: str = "state"):
    """Rebuild the types of `template` (a fresh algorithm.init state) around saved values."""
    def bad():
        return FedtextError(f"{STATE_FILE}: {where} does not fit this run's algorithm")

    if isinstance(template, tuple) and hasattr(template, "_fields"):
        if not isinstance(plain, dict) or set(plain) != set(template._fields):
            raise bad()
        return type(template)(**{f: restore_state(getattr(template, f), plain[f], f"{where}.{f}")
                                 for f in template._fields})
    if isinstance(template, dict):
        if not isinstance(plain, dict) or set(plain) != set(template):
            raise bad()
        return {k: restore_state(v, plain[k], f"{where}.{k}") for k, v in template.items()}
    if isinstance(template, list | tuple):
        if not isinstance(plain, list | tuple) or len(plain) != len(template):
            raise bad()
        return type(template)(restore_state(t, p, where) for t, p in zip(template, plain))
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
        self.out.mkdir(parents=True, exist_ok=True)
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
