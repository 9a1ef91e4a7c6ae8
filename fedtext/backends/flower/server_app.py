"""The fedtext ServerApp: fedtext's own `train()` over the SuperNodes of a Flower run.

    flwr run <fedtext-app> <connection> --run-config rc.toml    (fedtext flower run builds it)

Run config (the keys of fedtext-app/pyproject.toml; `fedtext flower run` fills them):

    config      a fedtext config TOML file on this machine (optional; for `flwr run` by hand)
    sources     JSON list of [where, settings] on top of it: the experiment config as
                `fedtext train` merges it (a --config file's tables, then the flags)
    out         the run directory, on this (the ServerApp's) machine: metrics.jsonl,
                state.pt (a checkpoint every round), final/, flower.log
    resume      continue the run in `out` from its last checkpoint
    min-nodes   wait for this many SuperNodes before starting (0: the clients per round)
    wait-nodes  ... for at most this many seconds
    command     the command line that started the run (provenance)

Flower keeps no training state: a ServerApp that is killed loses nothing but its current
round, and `resume = true` (a new `flwr run`) continues from state.pt exactly as
`fedtext train --resume` does. The nodes' data never comes here; the run's [data] source is
recorded as "flower:nodes".
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtext import config as C
from fedtext.backends.flower import messages as M
from fedtext.backends.flower.backend import FlowerBackend, node_population
from fedtext.backends.flower.commands import LOG_FILE
from fedtext.errors import FedtextError

app = ServerApp()


class RunLog:
    """Log lines to stdout (`flwr log`, `flwr run --stream`) and to out/flower.log once `out`
    holds the run (its state.pt: a new run's directory must be empty until train() has
    checked it); lines before that are kept and written then."""

    def __init__(self, out: Path):
        self.out, self.waiting = out, []

    def __call__(self, line: str) -> None:
        from fedtext.run.recorder import STATE_FILE

        line = f"{time.strftime('%H:%M:%S')} {line}"
        print(line, flush=True)
        self.waiting.append(line)
        if (self.out / STATE_FILE).exists():
            with open(self.out / LOG_FILE, "a", encoding="utf-8") as f:
                f.write("".join(w + "\n" for w in self.waiting))
            self.waiting = []


def effective_config(sources: list, out: Path, resume: bool) -> C.ExperimentConfig:
    """The config train() will run: a resumed run's saved config under the sources."""
    base = C.ExperimentConfig()
    if resume:
        from fedtext.run.recorder import STATE_FILE
        from fedtext.run.state import load_state

        saved = load_state(out / STATE_FILE, required=("config",))
        base = C.from_dict(saved["config"], str(out / STATE_FILE))
    return C.merge(base, *sources)


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    out = Path(str(rc["out"])).expanduser()
    log = RunLog(out)
    try:
        run(grid, rc, out, log)
    except FedtextError as e:  # the run's status (flwr ls) says "failed" with this text
        log(f"fedtext: error: {e}")
        raise


def run(grid: Grid, rc, out: Path, log) -> None:
    from fedtext.run.train import train

    if not out.is_absolute():
        raise FedtextError(f"out must be an absolute path on the ServerApp's machine, not "
                           f"{out}")
    resume = bool(rc["resume"])
    sources = [(str(w), s) for w, s in json.loads(str(rc["sources"]))]
    if str(rc.get("config", "")):
        sources.insert(0, (str(rc["config"]), C.load_toml(str(rc["config"]))))
    sources.append(("flower", {"data": {"source": M.NODE_SOURCE}}))  # the nodes' own data
    cfg = effective_config(sources, out, resume)
    min_nodes = int(rc["min-nodes"]) or len(cfg.sampling.clients) or \
        cfg.sampling.clients_per_round
    log(f"fedtext ServerApp: run {grid.run.run_id}, out {out}{' (resume)' if resume else ''}; "
        f"waiting for {min_nodes} SuperNodes")
    backend = FlowerBackend(grid, threads=cfg.backend.threads, log=log)
    backend.wait_for_nodes(min_nodes, float(rc["wait-nodes"]))
    population = node_population(backend, cfg)
    result = train(cfg, out, resume=resume, sources=sources, population=population,
                   backend=backend, progress=False, tensorboard=True,
                   command=str(rc["command"]), log=log)
    log(f"fedtext ServerApp: {result.state.round} rounds done; run in {out}")
