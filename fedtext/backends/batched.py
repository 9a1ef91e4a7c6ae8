"""BatchedBackend: a round's clients trained `group_size` at a time in one grouped model.

    backend = BatchedBackend(group_size=32)          # device: the ClientConfig's (--device)
    for i, result in backend.map(client_update, jobs, shared): ...

Made for GPUs and rounds of many small clients: one client at a time keeps a GPU mostly idle,
G clients at once (fedtext.fl.batched) give every kernel G times the work. Results are those
of client_update within float rounding (fedtext.fl.batched's docstring says how close), so
fed_avg over this backend computes the same round as over SequentialBackend.

Groups are formed in job order: jobs 0..G-1, then G..2G-1, ... A client whose data fails to
load (or has ids outside the vocabulary) comes back as a ClientFailure and the rest of its
group trains without it; if the grouped training itself raises, the group is re-run one client
at a time (client_update), so a failure is pinned on the client that caused it. A `timeout`
applies to a whole group, after the fact (its clients train together and finish together):
every client of a group that took longer is a ClientFailure, as in SequentialBackend.

Any `fn` other than fedtext.fl.client.client_update (an evaluation, a custom client) runs one
job at a time, as SequentialBackend does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch

from fedtext.backends.base import ClientFailure, SequentialBackend, failure
from fedtext.errors import FedtextError
from fedtext.fl import batched
from fedtext.fl.client import client_update

DEFAULT_GROUP_SIZE = 32  # a 100-client round in 4 groups; GRU 1024 x 32 fits a GPU easily


class BatchedBackend:
    """Trains `group_size` clients at once on `device` (None: the ClientConfig's device)."""

    def __init__(self, group_size: int = DEFAULT_GROUP_SIZE, device: str | None = None,
                 threads: int | None = None):
        if group_size < 1:
            raise FedtextError(f"group_size must be >= 1, not {group_size}")
        self.group_size, self.device, self.threads = group_size, device, threads

    def map(self, fn: Callable, jobs: Sequence[dict], shared: dict | None = None,
            timeout: float | None = None) -> Iterator[tuple[int, Any]]:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        shared = dict(shared or {})
        if fn is not client_update:
            yield from SequentialBackend().map(fn, jobs, shared, timeout)
            return
        params, config = shared["global_params"], shared["config"]
        if self.device is not None:
            config = replace(config, device=self.device)
        batched.check_config(config)  # unsupported settings stop the run, not a client
        for lo in range(0, len(jobs), self.group_size):
            group = range(lo, min(lo + self.group_size, len(jobs)))
            t0 = time.perf_counter()
            results: dict[int, Any] = {}
            steps = {}
            for i in group:
                try:
                    steps[i] = batched.client_steps(jobs[i]["client_data"], config,
                                                    jobs[i]["seed"])
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as e:  # this client's data: the policy decides
                    results[i] = failure(e)
            try:
                trained = batched.train_group(params, list(steps.values()), config)
                results.update(zip(steps, trained))
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception:  # find out whose: one client at a time
                seq = SequentialBackend().map(fn, [jobs[i] for i in steps],
                                              {"global_params": params, "config": config})
                results.update((list(steps)[k], r) for k, r in seq)
            took = time.perf_counter() - t0
            for i in group:
                r = results[i]
                if timeout is not None and took > timeout and not isinstance(r, ClientFailure):
                    r = ClientFailure(f"timed out (its group of {len(group)} took "
                                      f"{took:.1f} s > {timeout:g} s)")
                yield i, r

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
