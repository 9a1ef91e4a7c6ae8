"""`train(cfg, out)`: a TrainConfig wired to the experiment loop, in a run directory.

    RUN/config.toml     the effective config          RUN/metrics.jsonl   one row per round
    RUN/state.pt        ServerState + RNGs (resume)   RUN/tb/             TensorBoard events
    RUN/final/          the trained model, a checkpoint for `fedtext evaluate` / `generate`

The pieces, each built from the config: the initial model (`load_initial_model`), the
algorithm (`build_algorithm`: fed_avg with the client work, server optimizer, aggregator and
weighting), the sampler (`build_sampler`), each client's batches (`client_epoch_batches`,
built lazily inside the client job), and the held-out EvalSet (a fixed seeded sample of test
clients). A new run refuses a directory that holds anything; --resume refuses one that was
started with other settings (only rounds and eval_every may change).
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fedtext import aggregators, gru, server_optimizers
from fedtext.batching import client_batches
from fedtext.client import ClientConfig, cached_model, load_params
from fedtext.config import TrainConfig, differences, merge, save_toml
from fedtext.errors import FedtextError
from fedtext.experiment import (
    CONFIG_FILE,
    FINAL_DIR,
    METRICS_FILE,
    STATE_FILE,
    EvalSet,
    ProgressBackend,
    RunRecorder,
    build_eval_set,
    eval_sample,
    evaluate_eval_set,
    format_row,
    load_state,
    read_metrics,
    restore_state,
    run_rounds,
)
from fedtext.fedavg import FederatedAlgorithm, ServerState, fed_avg
from fedtext.model import CharRNN, ModelConfig
from fedtext.sampling import FixedSampler, UniformSampler, WeightedSampler


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
        state = restore_state(template, saved["server_state"])
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
        state = run_rounds(algorithm, state, sampler, client_data, cfg.rounds,
                           evaluate=evaluate, eval_every=cfg.eval_every, on_round=recorder,
                           backend=backend, progress=progress, log=log, until=until_round)
    finally:
        recorder.close()
        gru.set_precision(last_precision)

    # A copy of the built model, not CharRNN(...): a GRU 1024's orthogonal init takes seconds.
    final = copy.deepcopy(eval_model)
    load_params(final, state.params)
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
