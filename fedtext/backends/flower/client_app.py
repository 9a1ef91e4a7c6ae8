"""The fedtext ClientApp: a SuperNode's client, training on the node's own data only.

    flower-supernode ... --node-config "data-path='/data/me' client-id='ALICE'"

Node config (the SuperNode's `--node-config`, fixed for its life):

    data-path   a directory of <client>.txt files, a .jsonl file, or "shakespeare"
    client-id   which client of that data this node is (optional when it holds one client)
    cache-dir   fedtext's data cache on this node (optional; "shakespeare" builds there)
    threads     torch CPU threads for this node's work (optional; default: the run's
                [backend] threads, else torch's choice)

Each handler decodes the message (messages.py), names the node's own data (a ClientData of
data-path and its client id: the job never carries data, and nobody sends this node another
client's), and calls the function the simulator calls. Anything that goes wrong is one Error
reply whose reason is the FedtextError's text (bad data, an unknown client id) or the
exception's one-line summary, so the server logs it and the round goes on without this node.
Flower starts a fresh process per message, so nothing is kept between rounds.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from fedtext.backends.base import failure
from fedtext.backends.flower import messages as M
from fedtext.data.tasks import SHAKESPEARE, open_dataset
from fedtext.errors import FedtextError
from fedtext.fl.client import client_update
from fedtext.run.evaluation import evaluate_client

app = ClientApp()


def own_data(node_config) -> tuple[str, str, str | None]:
    """(data source, client id, cache dir) of this node, its data opened and checked."""
    path = str(node_config.get("data-path", "")).strip()
    if not path:
        raise FedtextError("this SuperNode has no data: start it with --node-config "
                           "\"data-path='/path/to/data'\" (fedtext flower supernode --data)")
    source = path if path == SHAKESPEARE else str(Path(path).expanduser().resolve())
    cache = str(node_config["cache-dir"]) if node_config.get("cache-dir") else None
    ds = open_dataset(source, cache)
    cid = str(node_config.get("client-id", "")).strip()
    if not cid:
        if len(ds.train) != 1:
            raise FedtextError(f"{path} holds {len(ds.train)} clients: set client-id in the "
                               "node config (fedtext flower supernode --client-id)")
        cid = ds.train.client_ids[0]
    ds.train.num_chars(cid)  # an unknown id: a FedtextError naming it
    return source, cid, cache


def _error(msg: Message, e: Exception) -> Message:
    if isinstance(e, FedtextError):
        code, reason = M.FEDTEXT_ERROR, " ".join(str(e).split())
    else:  # a bug or a broken node: the whole traceback stays in this node's log
        traceback.print_exc(file=sys.stderr)
        code, reason = M.CLIENT_FAILED, failure(e).reason
    print(f"[fedtext node] {msg.metadata.message_type}: error: {reason}", flush=True)
    return Message(Error(code=code, reason=reason), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who this node is: its client id and the size of its data (for sampling)."""
    from fedtext import __version__

    try:
        source, cid, cache = own_data(context.node_config)
        ds = open_dataset(source, cache)
        test = ds.test.num_chars(cid) if cid in ds.test.client_ids else 0
        return Message(M.info_reply({"client-id": cid, "fedtext": __version__,
                                     "train-chars": ds.train.num_chars(cid),
                                     "test-chars": test}), reply_to=msg)
    except Exception as e:  # noqa: BLE001 - every problem is the reply, not a crash
        return _error(msg, e)


def _run(msg: Message, context: Context, fn, reply) -> Message:
    try:
        t0 = time.perf_counter()
        waited = time.time() - msg.metadata.created_at  # delivery + this process's start
        source, cid, cache = own_data(context.node_config)
        params, job_json = M.read_instruction(msg.content)
        job = M.job_from_json(job_json, source, cache)
        if job["client_id"] != cid:
            raise FedtextError(f"this node holds client {cid}, not {job['client_id']}")
        threads = context.node_config.get("threads") or job["threads"]
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        result = fn(params, job["client_data"], job["config"], job["seed"])
        took = time.perf_counter() - t0
        print(f"[fedtext node] {msg.metadata.message_type} client {cid}: {took:.2f} s "
              f"(started {waited:.1f} s after the server sent it)", flush=True)
        return Message(reply(result, {"node-seconds": took, "node-wait-seconds": waited}),
                       reply_to=msg)
    except Exception as e:  # noqa: BLE001
        return _error(msg, e)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """client_update on this node's train split: the delta and the metric sums."""
    return _run(msg, context, client_update, M.train_reply)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """evaluate_client on this node's data (the split the job names: test)."""
    return _run(msg, context, evaluate_client, M.eval_reply)
