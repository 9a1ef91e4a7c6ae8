"""The round loop: rounds of a FederatedAlgorithm, evaluation, a metrics row per round.

    state = run_rounds(algorithm, state, sampler, client_data, rounds,
                       evaluate=..., eval_due=EvalConfig().due, on_round=RunRecorder(...))

is FedJAX's `run_federated_experiment` in miniature: each round samples its clients (a pure
function of (seed, round)), names their data, applies the algorithm, evaluates when
`eval_due(round, rounds)` says so and hands (state, metrics row) to `on_round`
(fedtext.run.recorder writes the row, then the state). fedtext.run.train wires an
ExperimentConfig to all this (`fedtext train`).

A round whose training loss or new weights are not finite (NaN, inf: a learning rate too
large, say) stops the run with a FedtextError before anything of it is written, so the run
directory keeps the last good round and --resume (with a smaller rate) continues from there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from fedtext.errors import FedtextError
from fedtext.fl import params as P
from fedtext.fl.algorithm import FederatedAlgorithm, ServerState


@dataclass(frozen=True)
class RunConfig:
    """[run]: how long, and from which seed."""

    rounds: int = field(default=5, metadata={
        "metavar": "N", "help": "rounds of federated training (the tutorial's NUM_ROUNDS)"})
    seed: int = field(default=0, metadata={
        "metavar": "S", "help": "seed of client sampling, shuffling, the eval sample and a "
        "scratch model"})

    def __post_init__(self):
        if self.rounds < 1:
            raise FedtextError(f"rounds must be >= 1, not {self.rounds}")
        if self.seed < 0:
            raise FedtextError(f"seed must be >= 0, not {self.seed}")


def run_rounds(algorithm: FederatedAlgorithm, state: ServerState, sampler,
               client_data: Callable[[str], object], rounds: int, *,
               evaluate: Callable[[dict], dict] | None = None,
               eval_due: Callable[[int, int], bool] = lambda r, last: True,
               on_round: Callable[[ServerState, dict], None] | None = None,
               progress: bool = True, log: Callable[[str], None] | None = None,
               until: int | None = None) -> ServerState:
    """Run rounds state.round + 1 .. `rounds` and return the final state.

    Args:
        algorithm: what a round does (fed_avg(...)).
        state: where to start (algorithm.init(params), or a resumed state).
        sampler: .sample(round) -> client ids (fedtext.fl.sampling).
        client_data: client id -> its ClientData (batches, or a callable (epoch, seed)).
        rounds: the run's last round.
        evaluate: params -> dict of eval metrics, run after round r when eval_due(r, rounds).
        eval_due: when to evaluate (EvalConfig.due).
        on_round: called with (state, row) after every round: log and checkpoint there.
        progress: show a bar for the whole run (rounds done, ETA, last eval accuracy) and
            one per round below it (clients done, loss, chars/s).
        log: one-line messages (default: tqdm.write).
        until: stop after this round instead, as if interrupted there.
    """
    log = log or tqdm.write
    t_start, done_start = time.perf_counter(), state.round
    stop = rounds if until is None else min(until, rounds)
    # The whole run: tqdm's rate (and so its ETA) counts only the rounds done in this process.
    run_bar = tqdm(total=rounds, initial=state.round, desc="run", unit="round", position=0,
                   disable=not progress or state.round >= stop, dynamic_ncols=True)
    try:
        return _rounds(algorithm, state, sampler, client_data, rounds, stop, evaluate, eval_due,
                       on_round, progress, log, run_bar, t_start, done_start)
    finally:
        run_bar.close()


def _rounds(algorithm, state, sampler, client_data, rounds, stop, evaluate, eval_due, on_round,
            progress, log, run_bar, t_start, done_start) -> ServerState:
    while state.round < stop:
        r = state.round  # rounds done so far; this is round r + 1
        t0 = time.perf_counter()
        ids = sampler.sample(r)
        clients = [(cid, client_data(cid)) for cid in ids]
        bar = tqdm(total=len(clients), desc=f"round {r + 1}/{rounds}", unit="client",
                   leave=False, disable=not progress, dynamic_ncols=True, position=1)
        run = {"loss": 0.0, "count": 0}

        def on_result(i, res, bar=bar, run=run, t0=t0):  # a client finished
            del i
            run["loss"] += res.metrics["loss_sum"]
            run["count"] += res.metrics["count"]
            bar.update(1)
            if run["count"]:
                bar.set_postfix(loss=f"{run['loss'] / run['count']:.3f}",
                                chars_s=f"{run['count'] / (time.perf_counter() - t0):,.0f}",
                                refresh=False)

        try:
            new, m = algorithm.apply(state, clients, on_result=on_result)
        finally:
            bar.close()
        _check_finite(new, m, r + 1)
        state = new
        t1 = time.perf_counter()
        row = {"round": state.round, "clients": m["clients"], "client_ids": list(ids),
               "train_loss": m["train_loss"], "train_accuracy": m["train_accuracy"],
               "chars": m["chars"], "batches": m["num_batches"], "client_lr": m["client_lr"],
               "delta_norm": m["delta_norm"], "train_seconds": t1 - t0,
               "chars_per_s": m["chars"] / (t1 - t0)}
        if m.get("dropped"):  # clients left out of the round: who, and why
            row["dropped"] = m["dropped"]
        if m.get("attackers"):  # simulated attackers of this round
            row["attackers"] = m["attackers"]
        for k in ("upload_bytes", "upload_bytes_fp32"):  # what the clients sent up
            if k in m:
                row[k] = m[k]
        if evaluate is not None and eval_due(state.round, rounds):
            row.update(evaluate(state.params))
            row["eval_seconds"] = time.perf_counter() - t1
        row["seconds"] = time.perf_counter() - t0
        if on_round is not None:
            on_round(state, row)
        per_round = (time.perf_counter() - t_start) / (state.round - done_start)
        if row.get("eval_accuracy") is not None:
            run_bar.set_postfix(eval_acc=f"{row['eval_accuracy']:.4f}", refresh=False)
        run_bar.update(1)
        with tqdm.external_write_mode():  # the line above the run's bar, not through it
            log(format_row(row) + f"  (eta {hms(per_round * (stop - state.round))})")
    return state


def _check_finite(state: ServerState, metrics: dict, round: int) -> None:
    loss = metrics["train_loss"]
    bad = P.nonfinite(state.params)
    if bad or (isinstance(loss, float) and not math.isfinite(loss) and metrics["chars"]):
        what = f"the training loss became {loss}" if not math.isfinite(loss) else \
            f"the weights became non-finite ({bad[0]})"
        raise FedtextError(f"round {round}: {what}; stopped before saving it, so the run "
                           f"directory keeps round {round - 1}. Start a new run with a lower "
                           "--client-lr or --server-lr (or clip updates with --clip-norm)")


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


def hms(seconds: float) -> str:
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"
