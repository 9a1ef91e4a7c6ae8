"""ProcessBackend: a pool of long-lived worker processes on this machine.

    backend = ProcessBackend(workers=2, threads=1)
    for i, result in backend.map(client_update, jobs, shared): ...
    backend.close()

Why processes: a client's small matmuls scale badly over threads, so W workers x 1 thread
train W clients at once faster than one process with W threads trains them in turn.

How a round travels (no pickle of the model per client):

    main                                     worker k (spawned once, keeps its model)
    global params -> shared-memory buffer    reads them from the buffer (a view, no copy)
    ("round", token, fn, config)  ------->   once per round and worker
    ("job", i, slot, job) ---------------->  job names its client's data (ClientData): the
                                             worker opens the memory-mapped store itself
                                      <----  ("done", i, result without delta); the delta is
                                             in worker k's own shared result buffer
    copy the delta out, hand worker k the next job

Each worker has one job at a time, so at most `workers` deltas are ever in flight: the
aggregator's running sum keeps a round's memory flat however many clients it has. Results
come back as they finish; fed_avg puts them in client order (backends.base.in_order).

Faults: a worker that dies (kill -9, out of memory) is replaced and its client re-run with
the same job, so the same result; a job that raises comes back as a ClientFailure; with a
`timeout` a job still running after that many seconds has its worker killed and replaced
and comes back as a ClientFailure (which clients straggle depends on timing, by nature).
"""

from __future__ import annotations

import math
import multiprocessing.connection as mpc
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.multiprocessing as tmp

from fedtext.backends.base import ClientFailure, failure

_START_TIMEOUT = 300.0  # seconds for a spawned worker to import torch and say "ready"


def _layout(params: dict[str, torch.Tensor]) -> tuple:
    """(key, shape, dtype, offset, numel) per tensor, each offset aligned to 64 bytes."""
    out, offset = [], 0
    for k, v in params.items():
        out.append((k, tuple(v.shape), v.dtype, offset, v.numel()))
        offset += math.ceil(v.numel() * v.element_size() / 64) * 64
    return tuple(out)


def _buffer_bytes(layout: tuple) -> int:
    if not layout:
        return 64
    k, shape, dtype, offset, n = layout[-1]
    return offset + n * torch.empty(0, dtype=dtype).element_size() + 64


def _views(buf: torch.Tensor, layout: tuple) -> dict[str, torch.Tensor]:
    """Tensors shaped as in `layout`, living in the byte buffer `buf` (no copy)."""
    out = {}
    for k, shape, dtype, offset, n in layout:
        size = torch.empty(0, dtype=dtype).element_size()
        out[k] = buf[offset:offset + n * size].view(dtype).view(shape)
    return out


DEPTH = 2  # jobs queued per worker: the next one waits in the pipe while main aggregates


def _worker_main(conn, params_buf, result_bufs, layout, threads: int) -> None:
    """A worker's loop: take the round's fn and config, then jobs, until told to stop."""
    torch.set_num_threads(threads)
    params = _views(params_buf, layout)
    outs = [_views(b, layout) for b in result_bufs]  # one result buffer per queue slot
    fn = shared = None
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if msg[0] == "stop":
            return
        if msg[0] == "round":
            fn, shared = msg[2], {**msg[3], "global_params": params}
            continue
        _, token, i, slot, job = msg
        try:
            result = fn(**shared, **job)
        except KeyboardInterrupt:
            return
        except Exception as e:  # the client's problem: the main process applies the policy
            conn.send(("failed", token, i, slot, failure(e)))
            continue
        delta, out = getattr(result, "delta", None), outs[slot]
        if isinstance(delta, dict) and delta.keys() == out.keys() and hasattr(result,
                                                                              "_replace"):
            torch._foreach_copy_(list(out.values()), [delta[k] for k in out])
            conn.send(("done", token, i, slot, result._replace(delta=None), True))
        else:  # any other result (an evaluation's sums): small, so it goes by pipe
            conn.send(("done", token, i, slot, result, False))


class _Worker:
    def __init__(self, ctx, layout, threads):
        self.result_bufs = [torch.empty(_buffer_bytes(layout), dtype=torch.uint8)
                            .share_memory_() for _ in range(DEPTH)]
        self.layout, self.threads, self.ctx = layout, threads, ctx
        self.token = None  # the round whose fn/config this worker holds
        # Jobs of this round sent and not answered, oldest first: (index, slot); the oldest
        # one has been running since `started`.
        self.queue: deque = deque()
        self.started = 0.0
        self.outstanding = 0  # all jobs sent and not answered: an abandoned call's left-over
        # ones are answered first, and their answers discarded
        self.proc = self.conn = None

    def start(self, params_buf) -> None:
        ours, theirs = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker_main, daemon=True, args=(
            theirs, params_buf, self.result_bufs, self.layout, self.threads))
        self.proc.start()
        theirs.close()
        self.conn, self.token, self.outstanding = ours, None, 0
        self.queue = deque()

    def free_slot(self) -> int:
        used = {slot for _, slot in self.queue}
        return next(k for k in range(DEPTH) if k not in used)

    def wait_ready(self) -> None:
        try:
            ok = self.conn.poll(_START_TIMEOUT)
            msg = self.conn.recv() if ok else None
        except (EOFError, OSError):
            msg = None
        if msg is None or msg[0] != "ready":
            raise RuntimeError(f"a worker process did not start ({msg!r})")
        self.pid = msg[1]

    def kill(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
        if self.proc is not None:
            self.proc.join(5)
        if self.conn is not None:
            self.conn.close()


class ProcessBackend:
    """`workers` spawned processes with `threads` torch threads each (see the module doc)."""

    def __init__(self, workers: int = 2, threads: int = 1):
        self.n, self.threads = workers, threads
        self.ctx = tmp.get_context("spawn")  # fork would copy this process's threads and locks
        self.layout = None
        self.params_buf = None
        self.workers: list[_Worker] = []
        self.token = 0
        self.restarts = 0  # workers replaced after dying or timing out, over the backend's life

    def _ensure(self, params: dict[str, torch.Tensor]) -> None:
        """(Re)start the pool when it is not running or the params' layout changed."""
        layout = _layout(params)
        if layout == self.layout and self.workers:
            return
        self.close()
        self.layout = layout
        self.params_buf = torch.empty(_buffer_bytes(layout), dtype=torch.uint8).share_memory_()
        self.workers = [_Worker(self.ctx, layout, self.threads) for _ in range(self.n)]
        for w in self.workers:
            w.start(self.params_buf)
        for w in self.workers:
            w.wait_ready()

    def pids(self) -> list[int]:
        """The worker processes' pids (for tests that kill one)."""
        return [w.pid for w in self.workers]

    def _replace(self, w: _Worker) -> None:
        w.kill()
        w.start(self.params_buf)
        w.wait_ready()
        self.restarts += 1

    def map(self, fn: Callable, jobs: Sequence[dict], shared: dict | None = None,
            timeout: float | None = None) -> Iterator[tuple[int, Any]]:
        shared = dict(shared or {})
        params = shared.pop("global_params")
        self._ensure(params)
        # The round's params go into shared memory once; every worker reads the same bytes.
        # (Workers still busy with an abandoned call's job would read them too: wait for them.)
        for w in self.workers:
            while w.outstanding:
                self._drain_one(w)
        torch._foreach_copy_(list(_views(self.params_buf, self.layout).values()),
                             [params[k] for k, *_ in self.layout])
        self.token += 1
        token = self.token
        pending = deque(range(len(jobs)))
        for w in self.workers:
            w.queue.clear()

        def dispatch() -> None:
            for _ in range(DEPTH):  # breadth first: every worker busy before any gets two
                for w in self.workers:
                    if not pending or len(w.queue) >= DEPTH:
                        continue
                    i = pending.popleft()
                    if w.token != token:
                        w.conn.send(("round", token, fn, shared))
                        w.token = token
                    slot = w.free_slot()
                    w.conn.send(("job", token, i, slot, jobs[i]))
                    if not w.queue:
                        w.started = time.monotonic()
                    w.queue.append((i, slot))
                    w.outstanding += 1

        def lost(w: _Worker) -> None:
            """w died: a new worker re-runs its jobs, with the same results (they depend only
            on the job and the round)."""
            pending.extendleft(i for i, _ in reversed(w.queue))
            self._replace(w)

        dispatch()
        while any(w.queue for w in self.workers):
            busy = [w for w in self.workers if w.queue]
            wait_s = None
            if timeout is not None:
                wait_s = max(0.0, min(w.started + timeout for w in busy) - time.monotonic())
            ready = mpc.wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], wait_s)
            for w in busy:
                if w.conn in ready and w.conn.poll():
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        lost(w)
                        continue
                    i, slot = w.queue.popleft()
                    w.outstanding -= 1
                    w.started = time.monotonic()  # the next queued job starts now
                    result = self._result(msg, w)  # copied out of the slot before reuse
                    dispatch()  # the worker gets its next job before we aggregate this one
                    yield i, result
                elif w.proc.sentinel in ready or not w.proc.is_alive():
                    lost(w)
                    dispatch()
                elif timeout is not None and time.monotonic() - w.started > timeout:
                    i, _ = w.queue.popleft()  # the straggler; its queued follower re-runs
                    took = time.monotonic() - w.started
                    pending.extendleft(j for j, _ in reversed(w.queue))
                    self._replace(w)
                    dispatch()
                    yield i, ClientFailure(f"timed out ({took:.1f} s > {timeout:g} s)")

    def _drain_one(self, w: _Worker) -> None:
        """Wait for one answer of an abandoned call (or the worker's death) and drop it."""
        try:
            if w.conn.poll(_START_TIMEOUT):
                w.conn.recv()
                w.outstanding -= 1
                return
        except (EOFError, OSError):
            pass
        self._replace(w)

    def _result(self, msg, w: _Worker):
        if msg[1] != self.token:  # pragma: no cover - map drains abandoned jobs first
            raise RuntimeError("a worker answered for another round")
        if msg[0] == "failed":
            return msg[4]
        _, _, i, slot, result, in_buffer = msg
        if not in_buffer:
            return result
        # Copy the delta out: the worker's buffer slot is overwritten by a later job.
        delta = {k: v.clone() for k, v in _views(w.result_bufs[slot], self.layout).items()}
        return result._replace(delta=delta)
    def close(self) -> None:
        for w in self.workers:
            try:
                if w.proc is not None and w.proc.is_alive():
                    w.conn.send(("stop",))
                    w.proc.join(5)
            except (OSError, BrokenPipeError):
                pass
            w.kill()
        self.workers = []
        self.layout = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
