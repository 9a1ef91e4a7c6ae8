"""Federated Averaging (McMahan et al. 2017) and its adaptive server variants FedAvgM / FedAdagrad
/ FedAdam / FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization"), as one value-in,
value-out `FederatedAlgorithm` (FedJAX's contract):

    algorithm = fed_avg(client_config, server_optimizer, aggregator, weighting, backend)
    state = algorithm.init(params)                        # ServerState, round 0
    state, metrics = algorithm.apply(state, clients)      # one round

One round, in TFF's four roles (`compose_learning_process`); here they are plain arguments:

    ServerState(params, opt_state, agg_state, round)
        |  1 broadcast: the same global params to every client of the round
        v
    client_update(params, data_i, client_config, seed_i)     2 client work, i = 0..n-1,
        |  ClientResult(delta_i = params - local_i, metrics_i)     wherever the backend runs it
        v
    aggregator.aggregate([(delta_i, w_i), ...], agg_state)    3 aggregate: weighted mean delta
        |
        v
    server_optimizer.update(mean_delta, opt_state, params)    4 server update
        |
        v
    ServerState(params', opt_state', agg_state', round + 1)

With `server_optimizers.sgd(lr=1.0)` step 4 is `params - mean(global - local_i)`: the weighted
average of the client models, i.e. FedAvg. FedProx is `ClientConfig(mu=...)`. Client i's weight
w_i comes from its metrics (`aggregators.client_weight`: tokens, examples, uniform or a
function) and its seed from (seed, round, i), so every backend computes the same round.

Round metrics are pooled over clients from sums (train_loss = total loss_sum / total count,
never a mean of client means) plus a per-client list for percentiles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, Protocol

from fedtext import aggregators as agg_lib
from fedtext import params as P
from fedtext import server_optimizers
from fedtext.client import METRIC_SUMS, ClientConfig, ClientData, client_update, summarize
from fedtext.errors import FedtextError
from fedtext.params import Params
from fedtext.sampling import client_seed


class ServerState(NamedTuple):
    params: Params  # the global model (a CharRNN state_dict)
    opt_state: Any  # the server optimizer's state (e.g. AdamState)
    agg_state: Any  # the aggregator's state
    round: int  # rounds completed


class FederatedAlgorithm(NamedTuple):
    """init(params) -> ServerState; apply(state, clients) -> (state, metrics). Both pure.

    `clients` is a sequence of (client_id, client_data) pairs; client_data is what
    `client_update` takes (a list of Batch, or a callable (epoch, seed) -> batches).

    Example (FedAvg, one round on two tiny clients):
        >>> import torch
        >>> from fedtext.batching import Batch
        >>> from fedtext.client import ClientConfig
        >>> from fedtext.fedavg import fed_avg
        >>> from fedtext.model import CharRNN, ModelConfig
        >>> from fedtext.server_optimizers import sgd
        >>> cfg = ClientConfig(ModelConfig(vocab_size=8, embed_dim=4, hidden_size=8))
        >>> x = torch.randint(0, 8, (2, 5))
        >>> batch = Batch(x, x, torch.ones(2, 5, dtype=torch.bool))
        >>> algorithm = fed_avg(cfg, sgd(lr=1.0))
        >>> state = algorithm.init(CharRNN(cfg.model).state_dict())
        >>> state, metrics = algorithm.apply(state, [("a", [batch]), ("b", [batch, batch])])
        >>> state.round, metrics["clients"], metrics["num_batches"], metrics["chars"]
        (1, 2, 3, 30)
    """

    init: Callable[[Params], ServerState]
    apply: Callable[[ServerState, Sequence[tuple[Any, ClientData]]], tuple[ServerState, dict]]


class Backend(Protocol):
    def map(self, fn: Callable, jobs: Sequence[dict], shared: dict | None = None) -> list:
        """[fn(**shared, **job) for job in jobs], in order, wherever it likes to run them.
        `shared` (the global params, the config) is the same for every job: a distributed
        backend ships it once per round."""
        ...


class SequentialBackend:
    """Runs every client in this process, one after the other (the default; easy to debug)."""

    def map(self, fn: Callable, jobs: Sequence[dict], shared: dict | None = None) -> list:
        return [fn(**(shared or {}), **job) for job in jobs]


def fed_avg(client_config: ClientConfig,
            server_optimizer: server_optimizers.ServerOptimizer | None = None,
            aggregator: agg_lib.Aggregator | None = None,
            weighting: agg_lib.Weighting = "tokens",
            backend: Backend | None = None,
            seed: int = 0,
            client_fn: Callable = client_update) -> FederatedAlgorithm:
    """Build FedAvg (and FedAvgM/FedAdam/FedYogi/FedAdagrad/FedProx, by its arguments).

    Args:
        client_config: local training (epochs, batch cap, client optimizer, FedProx mu, model).
        server_optimizer: step on the mean delta; default `sgd(lr=1.0)`, plain FedAvg.
        aggregator: combines (delta, weight) pairs; default `aggregators.mean()`.
        weighting: "tokens", "examples" (TFF's NUM_EXAMPLES), "uniform" or metrics -> float.
        backend: where client work runs (`map`); default `SequentialBackend()`.
        seed: run seed; client i of round r gets `sampling.client_seed(seed, r, i)`.
        client_fn: the client work, `client_update` unless you bring your own with its signature.

    Returns:
        FederatedAlgorithm(init, apply).
    """
    server_optimizer = server_optimizer or server_optimizers.sgd(lr=1.0)
    aggregator = aggregator or agg_lib.mean()
    backend = backend or SequentialBackend()
    if isinstance(weighting, str) and weighting not in agg_lib.WEIGHTINGS:
        raise FedtextError(f"weighting must be one of {agg_lib.WEIGHTINGS} or a callable, "
                           f"got {weighting!r}")

    def init(params: Params) -> ServerState:
        params = P.clone(params)
        return ServerState(params, server_optimizer.init(params), aggregator.init(params), 0)

    def apply(state: ServerState, clients: Iterable[tuple[Any, ClientData]]):
        clients = list(clients)
        if not clients:
            raise FedtextError("a round needs at least one client")
        # 1 + 2: broadcast and client work (the backend decides where).
        jobs = [{"client_data": data, "seed": client_seed(seed, state.round, i)}
                for i, (_, data) in enumerate(clients)]
        results = backend.map(client_fn, jobs,
                              shared={"global_params": state.params, "config": client_config})
        # 3: aggregate the deltas.
        weights = [agg_lib.client_weight(r.metrics, weighting) for r in results]
        if not sum(weights) > 0:
            raise FedtextError(f"every client of round {state.round} has weight 0 "
                               f"(weighting={weighting!r}): nothing to average")
        delta, agg_state = aggregator.aggregate(
            [(r.delta, w) for r, w in zip(results, weights)], state.agg_state)
        # 4: server update.
        params, opt_state = server_optimizer.update(delta, state.opt_state, state.params)
        metrics = round_metrics(results, [cid for cid, _ in clients], weights)
        metrics.update(round=state.round, delta_norm=P.global_norm(delta))
        return ServerState(params, opt_state, agg_state, state.round + 1), metrics

    return FederatedAlgorithm(init, apply)


def round_metrics(results: Sequence, client_ids: Sequence, weights: Sequence[float]) -> dict:
    """Pool the clients' metric sums into the round's metrics (+ a per-client list)."""
    totals = summarize({k: sum(r.metrics[k] for r in results) for k in METRIC_SUMS})
    return {
        "train_loss": totals["loss"],  # token-weighted mean over all clients' batches
        "train_accuracy": totals["accuracy"],
        "train_tff_loss": totals["tff_loss"],  # TFF's: batch losses weighted by batch size
        "num_examples": totals["num_examples"],
        "num_batches": totals["num_batches"],
        "chars": totals["count"],  # counted target characters
        "clients": len(results),
        "client_metrics": [{"client_id": cid, "weight": w, **r.metrics}
                           for cid, r, w in zip(client_ids, results, weights)],
    }
