"""RunRecorder: a training run's metrics.jsonl, TensorBoard events and state.pt, in that order.

    recorder = RunRecorder(out, extra=lambda: {...}, start_round=state.round)
    recorder(state, row)      # after each round: the row, then the whole state (atomic)

Rows past `start_round` (a killed run's last, unsaved round; a half-written line) are trimmed
when the recorder opens, so a resumed run's metrics equal an uninterrupted run's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedtext.fl.algorithm import ServerState
from fedtext.run.state import append_row, plain, read_rows, save_state, trim_rows

STATE_FILE, METRICS_FILE, CONFIG_FILE = "state.pt", "metrics.jsonl", "config.toml"
FINAL_DIR, TB_DIR = "final", "tb"


class RunRecorder:
    """Writes a run directory's metrics.jsonl, TensorBoard events and state.pt."""

    def __init__(self, out: Path, extra: Callable[[], dict], start_round: int = 0,
                 tensorboard: bool = True, fields: dict | None = None,
                 annotate: Callable[[ServerState, dict], dict] | None = None):
        """extra(): facts saved beside the state; fields: added to every row; annotate(state,
        row): more entries for a round's row (its privacy spent, say)."""
        self.out, self.extra = Path(out), extra
        self.fields, self.annotate = dict(fields or {}), annotate
        self.metrics = self.out / METRICS_FILE
        trim_rows(self.metrics, "round", start_round)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when used

            # purge_step drops the events a killed run logged after its last saved round.
            self.tb = SummaryWriter(str(self.out / TB_DIR), purge_step=start_round + 1)

    def rows(self) -> list[dict]:
        return read_rows(self.metrics)

    def log_row(self, row: dict) -> None:
        row.update(self.fields)
        append_row(self.metrics, row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "round" and isinstance(v, int | float) and math.isfinite(v):
                    group = "eval" if k.startswith("eval_") else "train"
                    self.tb.add_scalar(f"{group}/{k.removeprefix('eval_')}", v, row["round"])
            self.tb.flush()

    def save(self, state: ServerState) -> None:
        """The whole state: server state, RNG states and the caller's extra facts."""
        name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
        save_state(self.out / STATE_FILE, {
            "server_state": plain(state), "torch_rng": torch.get_rng_state(),
            "numpy_rng": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            **self.extra()})

    def __call__(self, state: ServerState, row: dict) -> None:
        if self.annotate is not None:
            row.update(self.annotate(state, row))
        self.log_row(row)  # first the row, then the state: resume trims rows past the state
        self.save(state)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def restore_rngs(saved: dict) -> None:
    """Put back the RNG states RunRecorder.save recorded."""
    torch.set_rng_state(saved["torch_rng"])
    name, keys, *rest = saved["numpy_rng"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
