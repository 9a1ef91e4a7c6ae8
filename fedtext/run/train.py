"""`train(cfg, out)`: an ExperimentConfig wired to the round loop, in a run directory.

    RUN/config.toml     the effective config          RUN/metrics.jsonl   one row per round
    RUN/state.pt        ServerState + RNGs (resume)   RUN/tb/             TensorBoard events
    RUN/final/          the trained model, a checkpoint for `fedtext evaluate` / `generate`

The pieces, each built from its table of the config: the initial model ([model],
model.spec), the task and the clients' data ([data], data.tasks), the sampler ([sampling]),
the client work, server optimizer and aggregator ([client], [server], [aggregator], composed
by fl.algorithm.fed_avg), where clients run ([backend]) and the held-out EvalSet ([eval]).
Before any of that, the run directory is checked and locked: a new run needs a new or empty
directory, --resume one that holds a run started with the same settings (only what
config.RESUMABLE names may change), and one process at a time.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from fedtext import config as C
from fedtext.backends import base as backends
from fedtext.data.tasks import SHAKESPEARE, TASKS, ClientData, open_dataset
from fedtext.errors import FedtextError
from fedtext.fl import aggregators, sampling, server_optimizers
from fedtext.fl.algorithm import ServerState, fed_avg
from fedtext.fl.client import cached_model, load_params
from fedtext.fl.schedules import ScheduleConfig, schedule
from fedtext.model import recurrences
from fedtext.model.char_rnn import CharRNN, ModelConfig
from fedtext.model.spec import load_initial_model
from fedtext.run.evaluation import EvalSet, build_eval_set, eval_sample, evaluate
from fedtext.run.experiment import format_row, run_rounds
from fedtext.run.recorder import (
    CONFIG_FILE,
    FINAL_DIR,
    STATE_FILE,
    RunRecorder,
    restore_rngs,
)
from fedtext.run.state import load_state, open_run, read_rows, restore

SAVED_KEYS = ("server_state", "config", "model_config", "data", "torch_rng", "numpy_rng")


def data_summary(ds) -> dict:
    """What resume checks: the same clients and amount of text."""
    return {"name": ds.name, "train_clients": len(ds.train), "train_chars": ds.train.total_chars,
            "test_clients": len(ds.test), "test_chars": ds.test.total_chars}


def absolute_paths(cfg: C.ExperimentConfig) -> C.ExperimentConfig:
    """cfg with a model or data path made absolute: the saved config works from anywhere."""
    def absolute(v, keep):
        return v if v in keep or not Path(v).expanduser().exists() else \
            str(Path(v).expanduser().resolve())

    return replace(cfg, model=replace(cfg.model, init=absolute(cfg.model.init,
                                                               ("pretrained", "scratch"))),
                   data=replace(cfg.data, source=absolute(cfg.data.source, (SHAKESPEARE,))))


def check_step_memory(model_config: ModelConfig, batch_size: int, seq_len: int) -> None:
    """Refuse a batch whose training step would not fit in memory, before allocating it.

    Per token a step keeps about 3 float32 copies of the logits (logits, softmax, gradient)
    and ~10 H-wide activations per recurrent layer (gates, states and their gradients).
    """
    per_token = 3 * model_config.vocab_size + 10 * model_config.hidden_size * \
        model_config.num_layers + 2 * model_config.embed_dim
    need = 4 * per_token * batch_size * seq_len
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if need > 0.8 * avail:
        raise FedtextError(f"batches of {batch_size} x {seq_len} need about {need / 2**30:.1f} "
                           f"GiB per training step, more than the {avail / 2**30:.1f} GiB "
                           "available; lower --batch-size or --seq-len")


class Evaluator:
    """Central evaluation on a fixed set of held-out clients (built once)."""

    def __init__(self, eval_set: EvalSet):
        self.eval_set = eval_set
        self.client_ids = list(eval_set.client_ids)
        self.describe = f"{len(self.client_ids)} test clients, {eval_set.chars:,} chars"

    def evaluate(self, model: CharRNN, params, progress: bool = False) -> dict:
        load_params(model, params)
        return evaluate(model, self.eval_set, progress=progress)


@dataclass
class Population:
    """Who trains and who is evaluated: the simulator's clients, or a deployment's nodes.

    client_ids and sizes (train characters) drive sampling; client_data(cid) is what a job
    carries for that client; summary is what --resume checks; evaluator(cfg) builds the
    held-out evaluation (an object with .evaluate(model, params, progress) -> row entries,
    .client_ids and .describe).
    """

    client_ids: list[str]
    sizes: list[int]
    client_data: Callable[[str], object]
    summary: dict
    evaluator: Callable[[C.ExperimentConfig], object]


@dataclass
class DPSetup:
    aggregator: object  # fl.privacy.dp_gaussian(...)
    annotate: Callable  # (state, row) -> the round's privacy entries
    record: dict  # what the run saves: noise multiplier, population, cohort, sampling


def dp_setup(cfg: C.ExperimentConfig, sampler, saved: dict | None, log) -> DPSetup | None:
    """The DP aggregator and per-round accounting of cfg.dp (None when DP is off)."""
    from fedtext.fl import accounting, privacy

    d = cfg.dp
    if d.mode is None:
        return None
    if cfg.aggregator.weighting != "uniform":
        raise FedtextError("differential privacy weighs every client the same (the unit of "
                           f"privacy is a client): use --weighting uniform, not "
                           f"{cfg.aggregator.weighting}")
    if cfg.aggregator.name != "mean" or cfg.aggregator.clip_norm is not None:
        raise FedtextError("differential privacy clips and averages by itself: drop "
                           "--aggregator / --clip-norm (use --dp-clip)")
    if cfg.sampling.clients or cfg.sampling.method not in accounting.SAMPLINGS:
        raise FedtextError("differential privacy needs random clients each round: --sampling "
                           "poisson (each client with probability K/N) or uniform (exactly K)")
    population, cohort = len(sampler.client_ids), cfg.sampling.clients_per_round
    accounting.check_delta(d.delta, population)
    kind, acc = cfg.sampling.method, d.accountant
    accounting.make_accountant(kind, acc)  # pld with uniform sampling: refused here
    if saved is not None and saved.get("dp"):
        z = saved["dp"]["noise_multiplier"]  # as started: a resumed run's noise is the same
    elif d.noise_multiplier is not None:
        z = d.noise_multiplier
    else:
        z = accounting.calibrate(d.target_epsilon, cfg.run.rounds, d.delta, kind, population,
                                 cohort, acc)
        log(f"dp: noise multiplier {z:.4f} spends epsilon {d.target_epsilon:g} at delta "
            f"{d.delta:g} in {cfg.run.rounds} rounds ({kind} sampling, {cohort} of "
            f"{population} clients, {acc.upper()})")
    clip = d.clip if d.clip is not None else 0.1  # TFF's initial_l2_norm_clip
    aggregator = privacy.dp_gaussian(
        z, cohort, clip, adaptive=d.mode == "adaptive", target_quantile=d.target_quantile,
        clip_lr=d.clip_lr, clipped_count_stddev=d.clipped_count_stddev, zeroing=d.zeroing,
        seed=cfg.run.seed)

    def annotate(state, row):
        s = state.agg_state
        return {"epsilon": accounting.epsilon(z, state.round, d.delta, kind, population,
                                              cohort, acc),
                "dp_clip": s.last_clip, "dp_next_clip": s.clip, "dp_clipped": s.last_clipped,
                "dp_zeroed": s.last_zeroed, "dp_noise_multiplier": z}

    return DPSetup(aggregator, annotate, {"noise_multiplier": z, "population": population,
                                          "cohort": cohort, "sampling": kind,
                                          "delta": d.delta, "accountant": acc})


def simulated_population(cfg: C.ExperimentConfig, task, cache: str | None) -> Population:
    """The clients of cfg.data's dataset, each job naming its client's data (ClientData)."""
    ds = open_dataset(cfg.data.source, cache)
    for cid in cfg.sampling.clients:  # fixed clients: each must exist and have a batch
        n = ds.train.num_chars(cid)  # unknown ids: a FedtextError with suggestions
        if n < cfg.data.min_chars():
            raise FedtextError(f"client {cid} has {n} train chars: no batch of "
                               f"{cfg.data.batch_size}x{cfg.data.seq_len} without padding "
                               f"(needs {cfg.data.min_chars()}); drop --drop-remainder or "
                               "pick another client")

    def client_data(cid):  # a name, not batches: the batches are built in the client job
        return ClientData(cfg.data.source, cid, cfg.data, cfg.client.max_batches, "train",
                          cache)

    def evaluator(cfg):
        ids = list(cfg.eval.client_ids) or eval_sample(ds.test, cfg.eval.clients, cfg.run.seed)
        return Evaluator(build_eval_set(ds.test, ids, task, cfg.data))

    return Population(list(ds.train.client_ids), ds.train.chars_per_client.tolist(),
                      client_data, data_summary(ds), evaluator)


@dataclass
class TrainResult:
    state: ServerState  # the final server state
    rows: list[dict]  # every metrics row, round 0 first
    out: Path  # the run directory
    model: CharRNN  # the trained model (also in out/final)
    eval_set: EvalSet | None  # what eval_* was measured on (None with evaluation off)


def train(cfg: C.ExperimentConfig, out: str | Path, *, resume: bool = False,
          sources: Sequence[tuple[str, dict]] = (), model: CharRNN | None = None,
          cache_dir=None, until_round: int | None = None, progress: bool = True,
          tensorboard: bool = True, command: str = "", log: Callable[[str], None] = print,
          population: Population | None = None, backend=None) -> TrainResult:
    """Run (or resume) a federated training run into the directory `out`.

    Args:
        cfg: the config (defaults < TOML < flags, merged by the caller from `sources`).
        out: the run directory; must be new or empty unless `resume`.
        resume: continue the run in `out`. Its saved config is the base and `sources` go on
            top; only config.RESUMABLE settings may differ from what the run started with.
        sources: the (where, settings) pairs that made `cfg` (for resume).
        model: the initial model, if already loaded (else from cfg.model).
        cache_dir: the data cache (default $FEDTEXT_CACHE).
        until_round: stop after this round, as if killed there (for tests and slices).
        progress, tensorboard: per-round bars; TensorBoard events under out/tb.
        command: the command line, for the final checkpoint's provenance.
        log: where one-line messages go.
        population: who trains and who is evaluated; default the simulated clients of
            cfg.data (a deployment passes its nodes').
        backend: where client work runs; default the [backend] table's.

    Returns:
        TrainResult(state, rows, out, model, eval_set).
    """
    with open_run(out, resume=resume, state_file=STATE_FILE) as out:
        return _train(cfg, out, resume, sources, model, cache_dir, until_round, progress,
                      tensorboard, command, log, population, backend)


def _train(cfg, out, resume, sources, model, cache_dir, until_round, progress, tensorboard,
           command, log, population, backend) -> TrainResult:
    saved = None
    if resume:
        saved = load_state(out / STATE_FILE, required=SAVED_KEYS)
        base = C.from_dict(saved["config"], f"{out / STATE_FILE}")
        diff = C.conflicts(base, *sources)
        if diff:
            raise FedtextError(f"--resume: {out} was started with " + ", ".join(diff)
                               + "; only rounds, eval_every and how clients compute may "
                               "change (or use another --out)")
        cfg = C.merge(base, *sources)
        at = saved["server_state"].get("round", 0)
        if at > cfg.run.rounds:
            raise FedtextError(f"--resume: {out} is already at round {at}, past --rounds "
                               f"{cfg.run.rounds}; pass --rounds N with N > {at} to extend it")
        if at == cfg.run.rounds and (out / FINAL_DIR).exists():
            raise FedtextError(f"--resume: {out} already finished its {at} rounds; pass "
                               f"--rounds N with N > {at} to extend it")
    cfg = absolute_paths(cfg).resolved()
    task = TASKS[cfg.data.task]
    cache = str(cache_dir) if cache_dir is not None else None

    if population is None:
        population = simulated_population(cfg, task, cache)
    if saved is not None and saved["data"] != population.summary:
        raise FedtextError(f"--resume: the data differs from the run's ({saved['data']} vs "
                           f"{population.summary}); use the same --data")
    sampler = sampling.build(cfg.sampling, population.client_ids, population.sizes,
                             cfg.run.seed, cfg.data.min_chars(),
                             f"a batch of {cfg.data.batch_size}x{cfg.data.seq_len}")
    if saved is not None:
        model_config = ModelConfig(**saved["model_config"])
    else:
        if model is None:
            model = load_initial_model(cfg.model, task.vocab, task.model_defaults, cfg.run.seed)
        elif model.config.vocab_size != task.vocab.size:
            raise FedtextError(f"the model has {model.config.vocab_size} ids, the task "
                               f"{task.vocab.size}")
        model_config = model.config
    check_step_memory(model_config, cfg.data.batch_size, cfg.data.seq_len)  # before batching
    evaluator = population.evaluator(cfg) if cfg.eval.every > 0 else None

    cfg = replace(cfg, model=cfg.model.resolved(model_config))
    compute = cfg.model.compute()
    device = cfg.backend.device
    client = replace(cfg.client, model=model_config, compute=compute, device=device)
    client_lr = None
    if cfg.client.schedule != ScheduleConfig():
        client_lr = schedule(cfg.client.schedule, cfg.client.lr, cfg.run.rounds)

    dp = dp_setup(cfg, sampler, saved, log)
    aggregator = dp.aggregator if dp else aggregators.build(cfg.aggregator)

    with (backends.build(cfg.backend) if backend is None else nullcontext(backend)) as backend:
        algorithm = fed_avg(client, server_optimizers.build(cfg.server, cfg.run.rounds),
                            aggregator, cfg.aggregator.weighting,
                            backend, seed=cfg.run.seed, client_lr=client_lr,
                            faults=cfg.faults, attack=cfg.attack,
                            compression=cfg.compression,
                            char_ids=(task.vocab.first_id, len(task.vocab.chars)))
        if saved is not None:
            # A fresh init state is the template of types (NamedTuples) the saved values fill.
            template = algorithm.init(saved["server_state"]["params"])
            saved["server_state"].setdefault("codec_state", {})  # fedtext 0.1 had none
            state = restore(template, saved["server_state"], "server_state", str(out / STATE_FILE))
            restore_rngs(saved)
            log(f"resuming {out} after round {state.round} of {cfg.run.rounds}")
        else:
            state = algorithm.init({k: v.detach() for k, v in model.state_dict().items()})

        eval_model = cached_model(model_config, compute, device=device)

        def run_eval(params):
            return evaluator.evaluate(eval_model, params, progress)

        compute_info = recurrences.describe_compute(model_config, compute, device)  # or an error
        if cfg.backend.name == "batched":  # the clients train on the grouped model instead
            compute_info = {**compute_info, "impl": "grouped", "kernel": None,
                            "clients": "batched"}
        log("compute: " + ", ".join(f"{k} {v}" for k, v in compute_info.items()))
        C.save_toml(cfg, out / CONFIG_FILE, header="fedtext train: the effective configuration "
                    "of this run (flags > --config TOML > defaults).\n`fedtext train --config "
                    f"{out / CONFIG_FILE} --out NEW` repeats it.")

        def extra() -> dict:  # saved beside the server state: what resume checks against
            return {"config": C.to_dict(cfg), "model_config": model_config.to_dict(),
                    "data": population.summary,
                    "eval_client_ids": evaluator.client_ids if evaluator else [],
                    "compute": compute_info, "dp": dp.record if dp else None}

        path = "/".join(str(compute_info[k]) for k in ("impl", "kernel", "precision")
                        if compute_info.get(k))
        # Every row names the recurrence path that computed it (kernel/avx512/fp32, ...).
        recorder = RunRecorder(out, extra, state.round, tensorboard, fields={"compute": path},
                               annotate=dp.annotate if dp else None)
        try:
            if saved is None:
                recorder.save(state)  # from here on, --resume works
            rows = recorder.rows()
            if state.round == 0 and evaluator is not None and not rows:
                t0 = time.perf_counter()
                row = {"round": 0, "clients": 0, "chars": 0, **run_eval(state.params)}
                row["seconds"] = row["eval_seconds"] = time.perf_counter() - t0
                recorder.log_row(row)
                log(format_row(row) + f"  (before training; eval on {evaluator.describe})")
            state = run_rounds(algorithm, state, sampler, population.client_data,
                               cfg.run.rounds,
                               evaluate=run_eval if evaluator is not None else None,
                               eval_due=cfg.eval.due, on_round=recorder, progress=progress,
                               log=log, until=until_round)
        finally:
            recorder.close()

    # A copy of the built model, not CharRNN(...): a GRU 1024's orthogonal init takes seconds.
    final = copy.deepcopy(eval_model).cpu()
    load_params(final, state.params)
    rows = recorder.rows()
    if state.round >= cfg.run.rounds:
        from fedtext.model.checkpoint import save_checkpoint

        last_eval = next((r for r in reversed(rows) if r.get("eval_loss") is not None), {})
        save_checkpoint(out / FINAL_DIR, final, vocab=task.vocab, provenance={
            "kind": "federated", "base_model": cfg.model.init,
            "data": population.summary["name"],
            "task": task.name, "rounds": state.round, "command": command,
            "seed": cfg.run.seed, "config": C.to_dict(cfg), "compute": extra()["compute"],
            "eval_loss": last_eval.get("eval_loss"),
            "eval_accuracy": last_eval.get("eval_accuracy"),
            "dp": None if dp is None else {**dp.record, "epsilon": rows[-1].get("epsilon")},
        })
    if dp is not None and rows:
        log(f"privacy spent: epsilon {rows[-1].get('epsilon'):.4g} at delta "
            f"{cfg.dp.delta:g} after {state.round} rounds (noise multiplier "
            f"{dp.record['noise_multiplier']:.4g}, {cfg.sampling.method} sampling of "
            f"{cfg.sampling.clients_per_round} of {dp.record['population']} clients)")
    return TrainResult(state, rows, out, final.eval(),
                       getattr(evaluator, "eval_set", None))


def run_rows(out: str | Path) -> list[dict]:
    """The metrics rows of a run directory."""
    from fedtext.run.recorder import METRICS_FILE

    return read_rows(Path(out) / METRICS_FILE)
