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

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedtext.errors import FedtextError
from fedtext.registry import Registry


class Backend(Protocol):
    def map(self, fn: Callable, jobs: Sequence[dict], shared: dict | None = None
            ) -> Iterator[tuple[int, Any]]:
        """Yield (i, fn(**shared, **jobs[i])) for every job, in the order they complete."""
        ...

    def close(self) -> None:
        """Release workers (a no-op in process)."""
        ...


class SequentialBackend:
    """Runs every client in this process, one after the other (the default; easy to debug)."""

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def map(self, fn, jobs, shared=None):
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)
        for i, job in enumerate(jobs):
            yield i, fn(**(shared or {}), **job)

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


@dataclass(frozen=True)
class BackendConfig:
    """[backend]: where the clients of a round train."""

    name: str = field(default="sequential", metadata={
        "flag": "backend", "choices": BACKENDS.names,
        "help": "sequential: every client in this process, one after the other"})
    threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads per worker (default: torch's choice)"})

    def __post_init__(self):
        BACKENDS.check(self.name, "name")
        if self.threads is not None and self.threads < 1:
            raise FedtextError(f"threads must be >= 1, not {self.threads}")


def build(cfg: BackendConfig) -> Backend:
    """A backend for a [backend] table (close() it, or use it as a context manager)."""
    return BACKENDS[cfg.name](cfg)
