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
average of the client models, i.e. FedAvg. FedProx is `ClientConfig(prox_mu=...)`. Client i's weight
w_i comes from its metrics (`aggregators.client_weight`: tokens, examples, uniform or a
function) and its seed from (seed, round, i), so every backend computes the same round.

Round metrics are pooled over clients from sums (train_loss = total loss_sum / total count,
never a mean of client means) plus a per-client list for percentiles.

Faults ([faults], `FaultConfig`): a client whose work raised, timed out or whose worker died
for good comes back as a backends.base.ClientFailure; `on_client_error="drop"` leaves it out
of the round (named, with its reason, in metrics["dropped"]) as long as at least
`min_clients` clients returned, `"fail"` stops the run naming the client. `dropout` drops
sampled clients before they train (seeded). A client whose update holds NaN or inf is always
left out (and named): a round never averages a NaN into the model.

Between client work and the aggregator, in this order: simulated attacks on the results
(fedtext.fl.attacks; label-flip acts on the data instead), the non-finite filter, and
compression (fedtext.fl.compression: what the server decodes is what it aggregates; the
round's upload bytes and their float32 equivalent go into the metrics).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from fedtext.backends.base import Backend, ClientFailure, SequentialBackend, in_order
from fedtext.errors import FedtextError
from fedtext.fl import aggregators as agg_lib
from fedtext.fl import attacks, server_optimizers
from fedtext.fl import params as P
from fedtext.fl.attacks import AttackConfig
from fedtext.fl.client import METRIC_SUMS, ClientConfig, ClientData, client_update, summarize
from fedtext.fl.compression import CompressionConfig, fp32_bytes
from fedtext.fl.compression import roundtrip as roundtrip_compression
from fedtext.fl.params import Params
from fedtext.fl.sampling import client_seed


@dataclass(frozen=True)
class FaultConfig:
    """[faults]: what a round does about clients that fail."""

    on_client_error: str = field(default="fail", metadata={
        "choices": ("fail", "drop"), "help": "a client that raises, times out or loses its "
        "worker: fail stops the run naming it; drop leaves it out of the round (logged)"})
    min_clients: int = field(default=1, metadata={
        "help": "with drop: the fewest clients a round may aggregate"})
    client_timeout: float | None = field(default=None, metadata={
        "help": "drop a client still training after this many seconds (a straggler; which "
        "ones depends on timing, so runs with it are not reproducible)"})
    dropout: float = field(default=0.0, metadata={
        "help": "each sampled client drops out before training with this probability "
        "(seeded: a device that went away)"})

    def __post_init__(self):
        if not 0 <= self.dropout < 1:
            raise FedtextError(f"dropout must be in [0, 1), not {self.dropout}")
        if self.on_client_error not in ("fail", "drop"):
            raise FedtextError(f"on_client_error must be fail or drop, not "
                               f"{self.on_client_error!r}")
        if self.min_clients < 1:
            raise FedtextError(f"min_clients must be >= 1, not {self.min_clients}")
        if self.client_timeout is not None and not self.client_timeout > 0:
            raise FedtextError(f"client_timeout must be > 0, not {self.client_timeout}")


class ServerState(NamedTuple):
    params: Params  # the global model (a CharRNN state_dict)
    opt_state: Any  # the server optimizer's state (e.g. AdamState)
    agg_state: Any  # the aggregator's state
    round: int  # rounds completed
    codec_state: dict | None = None  # client id -> error-feedback residual (top-k only)


class FederatedAlgorithm(NamedTuple):
    """init(params) -> ServerState; apply(state, clients) -> (state, metrics). Both pure.

    `clients` is a sequence of (client_id, client_data) pairs; client_data is what
    `client_update` takes (a list of Batch, or a callable (epoch, seed) -> batches such as
    fedtext.data.tasks.ClientData). apply's optional `on_result(position, result)` hears of
    each client as it finishes (a progress bar).

    Example (FedAvg, one round on two tiny clients):
        >>> import torch
        >>> from fedtext.data.batching import Batch
        >>> from fedtext.fl.algorithm import fed_avg
        >>> from fedtext.fl.client import ClientConfig
        >>> from fedtext.fl.server_optimizers import sgd
        >>> from fedtext.model.char_rnn import CharRNN, ModelConfig
        >>> cfg = ClientConfig(model=ModelConfig(vocab_size=8, embed_dim=4, hidden_size=8))
        >>> x = torch.randint(0, 8, (2, 5))
        >>> batch = Batch(x, x, torch.ones(2, 5, dtype=torch.bool))
        >>> algorithm = fed_avg(cfg, sgd(lr=1.0))
        >>> state = algorithm.init(CharRNN(cfg.model).state_dict())
        >>> state, metrics = algorithm.apply(state, [("a", [batch]), ("b", [batch, batch])])
        >>> state.round, metrics["clients"], metrics["num_batches"], metrics["chars"]
        (1, 2, 3, 30)
    """

    init: Callable[[Params], ServerState]
    apply: Callable[..., tuple[ServerState, dict]]


def fed_avg(client_config: ClientConfig,
            server_optimizer: server_optimizers.ServerOptimizer | None = None,
            aggregator: agg_lib.Aggregator | None = None,
            weighting: agg_lib.Weighting = "tokens",
            backend: Backend | None = None,
            seed: int = 0,
            client_fn: Callable = client_update,
            client_lr: Callable[[int], float] | None = None,
            faults: FaultConfig = FaultConfig(),
            attack: AttackConfig = AttackConfig(),
            compression: CompressionConfig = CompressionConfig(),
            char_ids: tuple[int, int] = (0, 86)) -> FederatedAlgorithm:
    """Build FedAvg (and FedAvgM/FedAdam/FedYogi/FedAdagrad/FedProx, by its arguments).

    Args:
        client_config: local training (epochs, batch cap, client optimizer, FedProx mu, model).
        server_optimizer: step on the mean delta; default `sgd(lr=1.0)`, plain FedAvg.
        aggregator: combines (delta, weight) pairs; default `aggregators.mean()`.
        weighting: "tokens", "examples" (TFF's NUM_EXAMPLES), "uniform" or metrics -> float.
        backend: where client work runs (`map`); default `SequentialBackend()`.
        seed: run seed; client i of round r gets `sampling.client_seed(seed, r, i)`.
        client_fn: the client work, `client_update` unless you bring your own with its signature.
        client_lr: round index -> the clients' learning rate (a schedule); default constant.
        faults: failing clients, dropouts (module docstring).
        attack: simulated attackers (fedtext.fl.attacks); off by default.
        compression: what clients upload (fedtext.fl.compression); float32 by default.
        char_ids: (first id, count) of the vocabulary's characters, for label-flip.

    Returns:
        FederatedAlgorithm(init, apply).
    """
    server_optimizer = server_optimizer or server_optimizers.sgd(lr=1.0)
    aggregator = aggregator or agg_lib.mean()
    backend = backend or SequentialBackend()
    if isinstance(weighting, str):
        agg_lib.WEIGHTINGS.check(weighting)
    label_flip = attack.kind == "label-flip"

    def init(params: Params) -> ServerState:
        params = P.clone(params)
        return ServerState(params, server_optimizer.init(params), aggregator.init(params), 0,
                           {})

    def apply(state: ServerState, clients: Iterable[tuple[Any, ClientData]],
              on_result: Callable[[int, Any], None] | None = None):
        clients = list(clients)
        r = state.round + 1
        # 1a: who is really there: dropouts leave before training (seeded).
        gone = set(attacks.dropped_positions(faults.dropout, seed, state.round, len(clients)))
        dropped = [{"client_id": clients[i][0], "reason": "dropped out (--dropout)"}
                   for i in sorted(gone)]
        attackers = set(attacks.attacker_positions(attack, seed, state.round, len(clients)))
        active = [i for i in range(len(clients)) if i not in gone]
        config = client_config
        if client_lr is not None:
            config = replace(config, lr=client_lr(state.round))
        if not active:
            if aggregator.aggregate_empty is None:
                if clients:
                    raise FedtextError(f"round {r}: every client dropped out")
                raise FedtextError("a round needs at least one client")
            # Poisson sampling drew nobody: DP still releases (noise) and charges the round.
            delta, agg_state = aggregator.aggregate_empty(state.params, state.agg_state)
            params, opt_state = server_optimizer.update(delta, state.opt_state, state.params)
            metrics = round_metrics([], [], [])
            metrics.update(round=state.round, delta_norm=P.global_norm(delta),
                           client_lr=getattr(config, "lr", None), dropped=dropped,
                           attackers=[], upload_bytes=0, upload_bytes_fp32=0)
            return state._replace(params=params, opt_state=opt_state, agg_state=agg_state,
                                  round=r), metrics
        # 1b + 2: broadcast and client work (the backend decides where; results come back in
        # any order and are put back in client order, so the round never depends on timing).
        # A client's seed comes from its position in the sampled list, dropouts or not.
        def job(i):
            data = clients[i][1]
            if label_flip and i in attackers:  # data poisoning: honest training, bad labels
                data = attacks.FlippedLabels(data, *char_ids)
            return {"client_data": data, "seed": client_seed(seed, state.round, i)}

        jobs = [job(i) for i in active]

        def arrivals():
            for j, result in backend.map(client_fn, jobs,
                                         shared={"global_params": state.params,
                                                 "config": config},
                                         timeout=faults.client_timeout):
                if on_result is not None and not isinstance(result, ClientFailure):
                    on_result(active[j], result)
                yield j, result

        seen = []  # (client id, metrics, weight) per aggregated client, in client order
        upload = {"bytes": 0, "fp32": 0}
        residuals = dict(state.codec_state or {})  # error feedback's per-client memory

        def weighted_deltas():
            for i, result in zip(active, in_order(arrivals(), len(jobs))):
                cid = clients[i][0]
                if isinstance(result, ClientFailure):
                    if faults.on_client_error == "fail":
                        raise FedtextError(f"round {r}: client {cid} failed: {result.reason} "
                                           "(--on-client-error drop would leave it out)")
                    dropped.append({"client_id": cid, "reason": result.reason})
                    continue
                delta = result.delta
                if i in attackers and not label_flip:  # what the attacker sends instead
                    delta = attacks.attack_delta(attack.kind, delta, seed, state.round, i)
                if P.nonfinite(delta):
                    # Under every aggregator: a NaN or inf update never reaches the model.
                    dropped.append({"client_id": cid, "reason": "non-finite update (NaN or "
                                    "inf)"})
                    continue
                delta, nbytes, residual = roundtrip_compression(
                    compression, delta, seed, state.round, i, residuals.get(cid))
                if residual is not None and compression.error_feedback:
                    residuals[cid] = residual
                upload["bytes"] += nbytes
                upload["fp32"] += fp32_bytes(delta)
                w = agg_lib.client_weight(result.metrics, weighting)
                seen.append((cid, result.metrics, w))
                yield delta, w  # the aggregator streams: one delta held at a time

        def too_few():
            reasons = "; ".join(f"{d['client_id']}: {d['reason']}" for d in dropped[:3])
            return FedtextError(f"round {r}: {len(seen)} of {len(clients)} clients returned "
                                f"a usable result, fewer than min_clients="
                                f"{faults.min_clients} (dropped: {reasons})")

        # 3: aggregate the deltas.
        try:
            delta, agg_state = aggregator.aggregate(weighted_deltas(), state.agg_state)
        except FedtextError as e:
            if dropped and len(seen) < faults.min_clients:
                raise too_few() from None
            raise FedtextError(str(e) if str(e).startswith(f"round {r}:")
                               else f"round {r}: {e}") from None
        if len(seen) < faults.min_clients:
            raise too_few()
        # 4: server update.
        params, opt_state = server_optimizer.update(delta, state.opt_state, state.params)
        metrics = round_metrics([m for _, m, _ in seen], [c for c, _, _ in seen],
                                [w for _, _, w in seen])
        metrics.update(round=state.round, delta_norm=P.global_norm(delta),
                       client_lr=getattr(config, "lr", None), dropped=dropped,
                       attackers=[clients[i][0] for i in sorted(attackers)],
                       upload_bytes=upload["bytes"], upload_bytes_fp32=upload["fp32"])
        return ServerState(params, opt_state, agg_state, r, residuals), metrics

    return FederatedAlgorithm(init, apply)


def round_metrics(client_metrics: Sequence[dict], client_ids: Sequence,
                  weights: Sequence[float]) -> dict:
    """Pool the clients' metric sums into the round's metrics (+ a per-client list)."""
    totals = summarize({k: sum(m[k] for m in client_metrics) for k in METRIC_SUMS})
    return {
        "train_loss": totals["loss"],  # token-weighted mean over all clients' batches
        "train_accuracy": totals["accuracy"],
        "train_tff_loss": totals["tff_loss"],  # TFF's: batch losses weighted by batch size
        "num_examples": totals["num_examples"],
        "num_batches": totals["num_batches"],
        "chars": totals["count"],  # counted target characters
        "clients": len(client_metrics),
        "client_metrics": [{"client_id": cid, "weight": w, **m}
                           for cid, m, w in zip(client_ids, client_metrics, weights)],
    }
