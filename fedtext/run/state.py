"""Run directories, shared by `fedtext train` and `fedtext pretrain`: nothing half-written,
nothing lost, one process at a time.

    with open_run(path, resume=False, state_file="state.pt") as out:   # checks + lock, first
        save_state(out / "state.pt", {...})                            # torch.save, atomic
        append_row(out / "metrics.jsonl", row)                          # one JSON line
        trim_rows(out / "metrics.jsonl", "round", last)                 # on resume
    load_state(out / "state.pt", required=("server_state", ...))        # clear errors

Order of writes: a round's metrics row first, then its state. A run killed between the two
leaves a row the state does not cover; `trim_rows` drops it on resume (and any half-written
last line), so the resumed run writes exactly the rows an uninterrupted one would.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from fedtext.errors import FedtextError
from fedtext.paths import atomic_path, atomic_write_text

LOCK_FILE = ".lock"


def prepare_out_dir(out: str | os.PathLike, *, resume: bool, state_file: str,
                    what: str = "run") -> Path:
    """Check `out` before any work: a new run needs a new or empty directory, a resumed one
    its state file; it must be a directory we can write. Creates it. Returns it as a Path."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise FedtextError(f"--out {out} is a file, not a directory; choose another --out")
    if resume:
        if not (out / state_file).exists():
            raise FedtextError(f"--resume: {out} holds no {what} ({state_file} missing); start "
                               "it without --resume")
    elif (out / state_file).exists():
        rows = read_rows(out / "metrics.jsonl")
        at = next((f" ({k} {rows[-1][k]})" for k in ("round", "step") if rows and k in rows[-1]),
                  "")
        raise FedtextError(f"{out} already holds a {what}{at}; pass --resume to continue it "
                           "or choose another --out")
    elif out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise FedtextError(f"{out} exists and is not an empty directory; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FedtextError(f"--out {out}: cannot write there ({e.strerror})") from None
    return out


@contextmanager
def open_run(out: str | os.PathLike, *, resume: bool, state_file: str,
             what: str = "run") -> Iterator[Path]:
    """prepare_out_dir + RunLock for the duration; a directory this call created is removed
    again if the run fails before writing anything into it (a refused run leaves no trace)."""
    out = Path(out).expanduser()
    created = not out.exists()
    out = prepare_out_dir(out, resume=resume, state_file=state_file, what=what)
    try:
        with RunLock(out):
            yield out
    except BaseException:
        if created and all(p.name == LOCK_FILE for p in out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)
        raise


class RunLock:
    """An exclusive lock on a run directory (flock on RUN/.lock, which holds the owner's pid).

    A second process on the same run gets a one-line refusal naming the holder; the lock goes
    away with the process, however it ends (so a killed run never leaves a stale lock).
    """

    def __init__(self, out: str | os.PathLike):
        self.path = Path(out) / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FedtextError(f"{self.path.parent} is in use by another fedtext process "
                               f"(pid {holder}); wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None


# ----------------------------------------------------------------------------- state files


def save_state(path: str | os.PathLike, payload: dict) -> None:
    """torch.save `payload` to `path` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_state(path: str | os.PathLike, required: Sequence[str] = ()) -> dict:
    """torch.load a state file (tensors and plain containers only), checking its keys."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FedtextError(f"--resume: {path.parent} holds no run ({path.name} missing); "
                           "start it without --resume") from None
    except Exception as e:  # a foreign, truncated or damaged file
        raise FedtextError(f"--resume: cannot read {path}: {' '.join(str(e).split())}") from None
    if not isinstance(state, dict):
        raise FedtextError(f"--resume: {path} is not a fedtext state file")
    missing = [k for k in required if k not in state]
    if missing:
        raise FedtextError(f"--resume: {path} lacks {', '.join(missing)} (damaged, or written "
                           "by another program); start a new run")
    return state


def plain(x):
    """NamedTuples -> dicts, recursively: what torch.load(weights_only=True) can read back."""
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return {f: plain(getattr(x, f)) for f in x._fields}
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [plain(v) for v in x]
    return x


def restore(template, saved, where: str = "state", file: str = "state file"):
    """Rebuild the types of `template` (e.g. a fresh algorithm.init state) around `saved`."""
    def bad():
        return FedtextError(f"{file}: {where} does not fit this run's algorithm")

    if isinstance(template, tuple) and hasattr(template, "_fields"):
        if not isinstance(saved, dict) or set(saved) != set(template._fields):
            raise bad()
        return type(template)(**{f: restore(getattr(template, f), saved[f], f"{where}.{f}", file)
                                 for f in template._fields})
    if isinstance(template, dict) and not template:  # keyed by what happened (client ids)
        if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor)
                                                  for v in saved.values()):
            raise bad()
        return dict(saved)
    if isinstance(template, dict):
        if not isinstance(saved, dict) or set(saved) != set(template):
            raise bad()
        return {k: restore(v, saved[k], f"{where}.{k}", file) for k, v in template.items()}
    if isinstance(template, list | tuple) and not template:  # a variable-length record
        if not isinstance(saved, list | tuple) or not all(isinstance(v, int | float)
                                                          for v in saved):
            raise bad()
        return type(template)(saved)
    if isinstance(template, list | tuple):
        if not isinstance(saved, list | tuple) or len(saved) != len(template):
            raise bad()
        return type(template)(restore(t, p, where, file) for t, p in zip(template, saved))
    if isinstance(template, torch.Tensor):
        if not isinstance(saved, torch.Tensor) or saved.shape != template.shape:
            raise bad()
        return saved.to(template.dtype)
    if (template is None) != (saved is None):
        raise bad()
    return saved


# ----------------------------------------------------------------------------- metrics.jsonl


def _json_value(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def append_row(path: str | os.PathLike, row: dict) -> None:
    """Append one row as a JSON line (NaN and inf become null: JSON has neither)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({k: _json_value(v) for k, v in row.items()}) + "\n")
        f.flush()


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl; a line cut short by a kill (or otherwise unreadable) is
    skipped, never an error."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def trim_rows(path: str | os.PathLike, key: str, last: int) -> list[dict]:
    """Keep the rows with row[key] <= last (and drop unreadable lines), atomically; returns
    the rows kept."""
    path = Path(path)
    rows = [r for r in read_rows(path) if isinstance(r.get(key), int) and r[key] <= last]
    if path.exists():
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows
