"""Where client work runs: the Backend contract and the in-process SequentialBackend.

    with build(BackendConfig()) as backend:
        for i, result in backend.map(client_update, jobs, shared):
            ...                                  # results as they complete, tagged by job

A backend only decides *where* `fn(**shared, **job)` runs. `shared` (the global params, the
client config) is the same for every job of a call, so a distributed backend ships it once;
a job is small (it names its client's data, never carries it). `map` yields `(index, result)`
as results complete; `in_order` restores job order with as little buffering as the arrival
order allows, which is how fed_avg aggregates (results depend on (seed, round, client) only,
never on which worker ran what).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from fedtext.errors import FedtextError
from fedtext.registry import Registry


class ClientFailure(NamedTuple):
    """What a backend yields for a job that raised, timed out or lost its worker."""

    reason: str  # one line: "ValueError: ...", "timed out after 30 s", ...


class Backend(Protocol):
    def map(self, fn: Callable, jobs: Sequence[dict], shared: dict | None = None,
            timeout: float | None = None) -> Iterator[tuple[int, Any]]:
        """Yield (i, fn(**shared, **jobs[i])) for every job, in the order they complete; a job
        that raises (or runs past `timeout` seconds) yields (i, ClientFailure(reason))."""
        ...

    def close(self) -> None:
        """Release workers (a no-op in process)."""
        ...


def failure(e: BaseException) -> ClientFailure:
    """A one-line reason for an exception raised by client work."""
    msg = " ".join(str(e).split()) or "".join(traceback.format_exception_only(type(e), e))
    return ClientFailure(f"{type(e).__name__}: {msg}"[:500])


class SequentialBackend:
    """Runs every client in this process, one after the other (the default; easy to debug).

    A timeout cannot interrupt work in this process: a client that took longer than `timeout`
    is dropped after the fact (a straggler, simulated)."""

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def map(self, fn, jobs, shared=None, timeout=None):
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)
        for i, job in enumerate(jobs):
            t0 = time.perf_counter()
            try:
                result = fn(**(shared or {}), **job)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # the client's problem, not the run's: the policy decides
                yield i, failure(e)
                continue
            took = time.perf_counter() - t0
            if timeout is not None and took > timeout:
                yield i, ClientFailure(f"timed out ({took:.1f} s > {timeout:g} s)")
            else:
                yield i, result

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def in_order(pairs: Iterable[tuple[int, Any]], n: int) -> Iterator[Any]:
    """Results of jobs 0..n-1 in job order, from (index, result) pairs in any order; holds only
    the results that arrived before their turn."""
    waiting: dict[int, Any] = {}
    nxt = 0
    for i, result in pairs:
        waiting[i] = result
        while nxt in waiting:
            yield waiting.pop(nxt)
            nxt += 1
    if nxt != n:
        raise RuntimeError(f"the backend returned {nxt} of {n} results")


# ----------------------------------------------------------------------------- [backend]

BACKENDS = Registry("backend")
BACKENDS.register("sequential", lambda cfg: SequentialBackend(cfg.threads))


def _processes(cfg):
    from fedtext.backends.processes import ProcessBackend  # spawns workers: only when asked

    return ProcessBackend(cfg.workers or 2, cfg.threads or 1)


def _ray(cfg):
    from fedtext.backends.ray import RayBackend  # `ray` is an optional extra

    return RayBackend(cfg.workers, cfg.threads or 1, cfg.ray_address)


def _batched(cfg):
    from fedtext.backends.batched import DEFAULT_GROUP_SIZE, BatchedBackend

    return BatchedBackend(cfg.group_size or DEFAULT_GROUP_SIZE, threads=cfg.threads)


BACKENDS.register("processes", _processes)
BACKENDS.register("ray", _ray)
BACKENDS.register("batched", _batched)


@dataclass(frozen=True)
class BackendConfig:
    """[backend]: where the clients of a round train."""

    name: str = field(default="sequential", metadata={
        "flag": "backend", "choices": BACKENDS.names,
        "help": "sequential: every client in this process, one after the other; processes: "
        "a pool of worker processes on this machine; ray: Ray actors, here or on a cluster; "
        "batched: --group-size clients at a time in one grouped model (for GPUs)"})
    workers: int | None = field(default=None, metadata={
        "help": "worker processes / Ray actors (default: 2 processes; Ray: one per CPU of "
        "the cluster, at most the clients of a round)"})
    threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads per worker (default: torch's choice in process, 1 in "
        "each worker)"})
    device: str = field(default="cpu", metadata={
        "metavar": "cpu|cuda[:N]", "help": "where clients train and the model is evaluated"})
    ray_address: str | None = field(default=None, metadata={
        "help": "join this Ray cluster (e.g. 10.0.0.1:6379, or auto); default: start Ray on "
        "this machine"})
    group_size: int | None = field(default=None, metadata={
        "flag": "group-size", "metavar": "G", "help": "backend batched: clients trained together "
        "(default 32; a round of more trains in groups of G, in client order; other backends "
        "ignore it)"})

    def __post_init__(self):
        BACKENDS.check(self.name, "name")
        for name in ("workers", "threads", "group_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise FedtextError(f"{name} must be >= 1, not {v}")



def build(cfg: BackendConfig) -> Backend:
    """A backend for a [backend] table (close() it, or use it as a context manager)."""
    return BACKENDS[cfg.name](cfg)
