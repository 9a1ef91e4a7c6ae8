"""What travels in a Flower message: a client job and its result as Flower records.

    instruction (train | evaluate)            reply
    "arrays"  ArrayRecord(global params)      train:    "arrays"  ArrayRecord(delta)
    "config"  ConfigRecord({"job": JSON})               "metrics" MetricRecord(METRIC_SUMS +
                                                                  "num-examples")
                                              evaluate: "metrics" MetricRecord(loss_sum,
                                                                  correct, count, num-examples)
                                              (+ node-seconds, node-wait-seconds: timing)
    instruction (query)                       reply
    "config"  ConfigRecord({"fedtext": v})    "info"    ConfigRecord(client-id, train-chars,
                                                                     test-chars, fedtext)
    any failure on the node                   Error(code, reason): FEDTEXT_ERROR for a
                                              FedtextError (bad data, unknown client),
                                              CLIENT_FAILED for anything else

The job is the JSON of a backend job (`{"client_data": ClientData, "seed": s}`) plus the
round's ClientConfig: everything `client_update` needs except the global params and the
data's source, which the node supplies itself (its own data, from its node config). Results
come back as the sums they are (METRIC_SUMS), and the server turns them into the same
ClientResult `client_update` returns, with `fl.client.summarize`: no math here.
"""

from __future__ import annotations

import json
import typing
from dataclasses import fields, is_dataclass

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtext.data.tasks import ClientData, DataConfig
from fedtext.errors import FedtextError
from fedtext.fl.client import METRIC_SUMS, ClientConfig, ClientResult, summarize

FEDTEXT_ERROR = 101  # a FedtextError on the node (its reason is the message); Flower's are 0-8
CLIENT_FAILED = 102  # any other exception (its traceback is in the SuperNode's log)
EVAL_SUMS = ("loss_sum", "correct", "count")  # what evaluate_client returns
NODE_SOURCE = "flower-node"  # ClientData.source of a job: "the node's own data"


def plain(dc) -> dict:
    """A (nested) frozen dataclass as JSON-able dicts."""
    return {f.name: plain(v) if is_dataclass(v) else list(v) if isinstance(v, tuple) else v
            for f in fields(dc) for v in [getattr(dc, f.name)]}


def from_plain(cls, d: dict):
    """Inverse of `plain`: nested dataclasses (also `X | None`) and tuples rebuilt."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name not in d:
            continue
        v, t = d[f.name], hints[f.name]
        inner = [a for a in typing.get_args(t) if a is not type(None)] or [t]
        if v is not None and is_dataclass(inner[0]):
            v = from_plain(inner[0], v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


def job_to_json(job: dict, config: ClientConfig, threads: int | None = None) -> str:
    """A backend job ({"client_data": ClientData, "seed": s}) and the round's config."""
    from fedtext import __version__

    cd = job["client_data"]
    if not isinstance(cd, ClientData):
        raise FedtextError("a Flower job names its client's data (ClientData), not batches")
    data = plain(cd.config)
    del data["source"]  # the node's own
    return json.dumps({"fedtext": __version__, "client_id": cd.client_id, "seed": job["seed"],
                       "config": plain(config), "data": data, "max_batches": cd.max_batches,
                       "split": cd.split, "threads": threads})


def job_from_json(text: str, source: str, cache_dir: str | None = None) -> dict:
    """The job as the node runs it: config, seed and a ClientData of its own `source`."""
    d = json.loads(text)
    data = from_plain(DataConfig, {**d["data"], "source": source})
    return {"client_id": d["client_id"], "seed": int(d["seed"]), "threads": d.get("threads"),
            "config": from_plain(ClientConfig, d["config"]), "fedtext": d.get("fedtext"),
            "client_data": ClientData(source, d["client_id"], data, d["max_batches"],
                                      d["split"], cache_dir)}


# ----------------------------------------------------------------------------- records


def params_record(params: dict) -> ArrayRecord:
    """The global params as one ArrayRecord (built once per round, sent to every node)."""
    return ArrayRecord({k: v.detach().cpu() for k, v in params.items()})


def instruction(arrays: ArrayRecord, job_json: str) -> RecordDict:
    return RecordDict({"arrays": arrays, "config": ConfigRecord({"job": job_json})})


def read_instruction(content: RecordDict) -> tuple[dict, str]:
    """(global params as tensors, job JSON)."""
    return content["arrays"].to_torch_state_dict(), str(content["config"]["job"])


def train_reply(result: ClientResult, timing: dict | None = None) -> RecordDict:
    sums = {k: result.metrics[k] for k in METRIC_SUMS}
    return RecordDict({"arrays": params_record(result.delta), "metrics": MetricRecord(
        {**sums, "num-examples": sums["num_examples"], **(timing or {})})})


def read_train_reply(content: RecordDict) -> ClientResult:
    """The ClientResult client_update returned on the node (same delta, same sums)."""
    m = content["metrics"]
    metrics = summarize({k: m[k] for k in METRIC_SUMS})
    return ClientResult(content["arrays"].to_torch_state_dict(), float(metrics["count"]),
                        metrics)


def eval_reply(sums: dict, timing: dict | None = None) -> RecordDict:
    return RecordDict({"metrics": MetricRecord({**{k: sums[k] for k in EVAL_SUMS},
                                                "num-examples": sums["count"],
                                                **(timing or {})})})


def read_timing(content: RecordDict) -> tuple[float, float] | None:
    """(seconds from the message's creation to its handler, seconds in the handler), as the
    node measured them (the first needs the two clocks to agree), or None."""
    m = content["metrics"] if "metrics" in content else {}
    if "node-seconds" not in m:
        return None
    return float(m["node-wait-seconds"]), float(m["node-seconds"])


def read_eval_reply(content: RecordDict) -> dict:
    m = content["metrics"]
    return {k: m[k] for k in EVAL_SUMS}


def query_instruction() -> RecordDict:
    from fedtext import __version__

    return RecordDict({"config": ConfigRecord({"fedtext": __version__})})


def info_reply(info: dict) -> RecordDict:
    return RecordDict({"info": ConfigRecord(info)})


def read_info_reply(content: RecordDict) -> dict:
    return dict(content["info"])
