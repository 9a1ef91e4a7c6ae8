"""FlowerBackend: a Backend whose `map` runs each job on the SuperNode that holds its client.

    backend = FlowerBackend(grid)                      # inside a ServerApp
    population = node_population(backend, cfg)         # ask the nodes who they are
    train(cfg, out, population=population, backend=backend)

One round of `map(client_update, jobs, shared, timeout)` (backends.base's contract):

    push   one Message per job to its client's node: the round's params (one ArrayRecord,
           stored once by Flower's content-addressed object store) + the job's JSON
    pull   every `poll` s; each reply is matched to its job by `reply_to_message_id` (never
           by the sender: errors the SuperLink makes up come from node 1)
    yield  (i, ClientResult) as replies arrive; (i, ClientFailure(reason)) for an Error reply
           (bad data, a crash: the node's own reason), a node that is offline or unknown, or
           no reply within `timeout` s ([faults] client_timeout, counted from the push)

fed_avg puts the results back in client order and applies the [faults] policy, so a round
over Flower computes what the simulator computes for the same clients and seeds. Without a
timeout a node that dies is only reported by Flower, after its missed heartbeats (about 40 to
60 s); with one, the round goes on after `timeout` s. Every failure is logged with the node
id and the client id.

Nodes are known by the client id in their node config, not by node id (which changes when a
SuperNode restarts): each `map` first asks any online node it has not met yet who it is, so a
restarted node takes its client's jobs again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from types import SimpleNamespace

import torch
from flwr.app import Message

from fedtext.backends.base import ClientFailure
from fedtext.backends.flower import messages as M
from fedtext.data.tasks import ClientData
from fedtext.errors import FedtextError
from fedtext.fl.client import ClientConfig, client_update
from fedtext.run.evaluation import eval_sample, evaluate_client, summarize
from fedtext.run.train import Population

KINDS = {client_update: ("train", M.read_train_reply),
         evaluate_client: ("evaluate", M.read_eval_reply)}
QUERY_TIMEOUT = 120.0  # seconds for a node to say who it is (its first ClientApp starts)


class FlowerBackend:
    """Client jobs as Flower messages to the nodes of a Grid (see the module docstring)."""

    def __init__(self, grid, threads: int | None = None, poll: float = 0.2,
                 log: Callable[[str], None] = print):
        """threads: torch threads per node job (a node's own `threads` setting wins);
        poll: seconds between pulls."""
        self.grid, self.threads, self.poll, self.log = grid, threads, poll, log
        self.nodes: dict[str, int] = {}  # client id -> node id
        self.info: dict[int, dict] = {}  # node id -> its query reply, or {"error": reason}
        self.round = 0  # map calls, for the messages' group ids
        self.clients: set[str] | None = None  # the run's population, once node_population ran

    # ---- nodes

    def online(self) -> set[int]:
        return {n.node_id for n in self.grid.get_nodes() if n.status in ("online", "")}

    def wait_for_nodes(self, n: int, seconds: float) -> set[int]:
        """Wait until at least n SuperNodes are online (or `seconds` pass)."""
        end = time.monotonic() + seconds
        while len(online := self.online()) < n and time.monotonic() < end:
            time.sleep(1.0)
        if len(online) < n:
            self.log(f"flower: {len(online)} of the {n} SuperNodes asked for are online after "
                     f"{seconds:g} s; going on with them")
        return online

    def discover(self) -> None:
        """Ask each online node not met yet for its client id and data sizes."""
        online = self.online()
        new = sorted(n for n in online if n not in self.info)
        if not new:
            return
        msgs = [Message(M.query_instruction(), dst_node_id=n, message_type="query",
                        ttl=QUERY_TIMEOUT + 60) for n in new]
        for k, reply in self._exchange(msgs, QUERY_TIMEOUT):
            node = new[k]
            reason = reply if isinstance(reply, str) else \
                reply.error.reason if reply.has_error() else None
            if reason is not None:
                self.info[node] = {"error": reason}
                self.log(f"flower: node {node} left out: {reason}")
                continue
            info = M.read_info_reply(reply.content)
            cid, had = str(info["client-id"]), self.nodes.get(str(info["client-id"]))
            if had is not None and had != node and had in online:
                self.info[node] = {"error": f"client {cid} is already node {had}'s"}
                self.log(f"flower: node {node} left out: it says it holds client {cid}, "
                         f"like node {had}")
                continue
            self.info[node], self.nodes[cid] = info, node
            from fedtext import __version__

            other = "" if info.get("fedtext") == __version__ else \
                f" (fedtext {info.get('fedtext')} there, {__version__} here)"
            late = "" if self.clients is None or cid in self.clients else \
                " (it joined after the run started: it takes part in the next run)"
            self.log(f"flower: node {node} is client {cid}: {info['train-chars']:,} train "
                     f"chars, {info['test-chars']:,} test chars{other}{late}")

    # ---- the Backend contract

    def map(self, fn: Callable, jobs: Sequence[dict], shared: dict | None = None,
            timeout: float | None = None) -> Iterator[tuple[int, object]]:
        if fn not in KINDS:
            raise FedtextError(f"the Flower backend runs client_update and evaluate_client on "
                               f"the nodes, not {getattr(fn, '__name__', fn)}")
        kind, read = KINDS[fn]
        shared = shared or {}
        self.discover()  # a restarted node comes back under a new node id
        online = self.online()
        self.round += 1
        arrays = M.params_record(shared["global_params"])  # one record for every message
        msgs, where = [], []
        for i, job in enumerate(jobs):
            cid = job["client_data"].client_id
            node = self.nodes.get(cid)
            if node is None or node not in online:
                yield i, self._failed(cid, node, "no online node holds this client"
                                      if node is None else "its node is offline")
                continue
            content = M.instruction(arrays, M.job_to_json(job, shared["config"], self.threads))
            msgs.append(Message(content, dst_node_id=node, message_type=kind,
                                group_id=f"{kind}-{self.round}",
                                ttl=None if timeout is None else timeout + 60))
            where.append((i, cid, node))
        t0, times = time.monotonic(), []  # per reply: (arrived, node's wait, node's work)
        for done, (k, reply) in enumerate(self._exchange(msgs, timeout), 1):
            i, cid, node = where[k]
            if isinstance(reply, str):
                result = self._failed(cid, node, reply)
            elif reply.has_error():
                result = self._failed(cid, node, f"{reply.error.reason} (Flower error code "
                                      f"{reply.error.code})")
            else:
                times.append((time.monotonic() - t0, *(M.read_timing(reply.content) or
                                                       (float("nan"),) * 2)))
                result = read(reply.content)
            if done == len(msgs) and times:  # before the last yield: the caller may stop
                a, w, n = (" / ".join(f"{x:.1f}" for x in col) for col in zip(*times))
                self.log(f"flower: {kind}: {len(times)} replies after {a} s; "
                         f"the nodes started them {w} s after sending and worked {n} s")
            yield i, result

    def _failed(self, cid: str, node: int | None, reason: str) -> ClientFailure:
        what = f"node {node} (client {cid})" if node is not None else f"client {cid}"
        self.log(f"flower: {what} failed: {reason}")
        return ClientFailure(f"{what}: {reason}"[:500])

    def _exchange(self, msgs: list, timeout: float | None) -> Iterator[tuple[int, object]]:
        """Push msgs; yield (k, reply Message) as replies come, (k, reason) for the rest."""
        if not msgs:
            return
        ids = list(self.grid.push_messages(msgs))
        if len(ids) != len(msgs):  # Flower refused the whole push (too large, say)
            ids = [None] * len(msgs)
        pending = {mid: k for k, mid in enumerate(ids) if mid}
        for k, mid in enumerate(ids):
            if not mid:
                yield k, "Flower could not send the message"
        end = None if timeout is None else time.monotonic() + timeout
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                k = pending.pop(reply.metadata.reply_to_message_id, None)
                if k is not None:
                    yield k, reply
            if pending and end is not None and time.monotonic() >= end:
                for k in pending.values():
                    yield k, f"no reply within {timeout:g} s (lost, or slower than the " \
                             "[faults] client_timeout)"
                return
            if pending:
                time.sleep(self.poll)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- population


def node_population(backend: FlowerBackend, cfg) -> Population:
    """The clients of the nodes that answered `discover`, as train() samples them."""
    backend.discover()
    ids = sorted(backend.nodes)
    if not ids:
        raise FedtextError("no SuperNode with usable data is online (see the nodes' errors "
                           "above)")
    info = [backend.info[backend.nodes[cid]] for cid in ids]
    backend.log(f"flower: {len(ids)} clients: {', '.join(ids)}")
    backend.clients = set(ids)

    def client_data(cid):  # the node supplies the source: its own data
        return ClientData(M.NODE_SOURCE, cid, cfg.data, cfg.client.max_batches, "train")

    def evaluator(cfg):
        return NodeEvaluator(backend, ids, [int(x["test-chars"]) for x in info], cfg)

    return Population(ids, [int(x["train-chars"]) for x in info], client_data,
                      {"name": "flower"}, evaluator)


class NodeEvaluator:
    """Held-out evaluation on the nodes' own test data: evaluate_client on each node, the
    per-client sums pooled by run.evaluation.summarize (the simulator's eval_* entries)."""

    def __init__(self, backend: FlowerBackend, client_ids: list[str], test_chars: list[int],
                 cfg):
        store = SimpleNamespace(client_ids=client_ids, chars_per_client=test_chars)
        ids = list(cfg.eval.client_ids) or eval_sample(store, cfg.eval.clients, cfg.run.seed)
        unknown = sorted(set(ids) - set(client_ids))
        if unknown:
            raise FedtextError(f"eval client_ids {', '.join(unknown)}: no node holds them")
        chars = dict(zip(client_ids, test_chars))
        self.backend, self.client_ids = backend, ids
        self.describe = f"{len(ids)} nodes' test data, {sum(chars[c] for c in ids):,} chars"
        # As build_eval_set: every test char, padded, in order.
        self.data = replace(cfg.data, shuffle=False, drop_remainder=False)
        self.compute, self.timeout = cfg.model.compute(), cfg.faults.client_timeout

    def evaluate(self, model, params, progress: bool = False) -> dict:
        del progress
        jobs = [{"client_data": ClientData(M.NODE_SOURCE, cid, self.data, None, "test"),
                 "seed": 0} for cid in self.client_ids]
        shared = {"global_params": params,
                  "config": ClientConfig(model=model.config, compute=self.compute)}
        sums = torch.zeros(3, len(jobs), dtype=torch.float64)
        ok, lost = [], []
        for i, r in self.backend.map(evaluate_client, jobs, shared, self.timeout):
            if isinstance(r, ClientFailure):
                lost.append({"client_id": self.client_ids[i], "reason": r.reason})
            else:
                sums[:, i] = torch.tensor([float(r[k]) for k in M.EVAL_SUMS],
                                          dtype=torch.float64)
                ok.append(i)
        row = summarize(sums[:, sorted(ok)])
        if lost:
            row["eval_dropped"] = lost
        return row
