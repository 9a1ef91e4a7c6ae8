"""Evaluation with the same metric sums as training (fedtext.client), so numbers line up:

    evaluate(model_or_params, batches) -> sums + loss / accuracy / tff_loss     one model, pooled
    evaluate_client(global_params, client_data, config, seed) -> the same       one client
    federated_evaluate(params, clients, config) -> pooled, per-client mean and percentiles

Federated evaluation (TFF's `build_fed_eval`) scores the global model on every client
separately. Pooled ("weighted") loss is total loss_sum / total count: every character weighs the
same. The unweighted mean gives every client the same say, and the percentiles of the
per-client loss and accuracy show how the model serves the worst and best clients.
`evaluate_client` has client_update's signature, so any backend can run it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from fedtext.batching import Batch
from fedtext.client import (
    METRIC_SUMS,
    ClientConfig,
    ClientData,
    batch_sums,
    cached_model,
    epoch_batches,
    load_params,
    summarize,
    sums_to_dict,
)
from fedtext.errors import FedtextError
from fedtext.fedavg import SequentialBackend
from fedtext.model import ModelConfig
from fedtext.params import Params

PERCENTILES = (10, 25, 50, 75, 90)


@torch.no_grad()
def evaluate(model_or_params: torch.nn.Module | Params, batches: Iterable[Batch],
             model_config: ModelConfig | None = None, precision: str = "float32",
             device: str = "cpu") -> dict:
    """Metric sums (client.METRIC_SUMS) and their means for a model on some batches.

    Args:
        model_or_params: a CharRNN, or a params dict (then `model_config` is required and a
            cached model of this process is used).
        batches: the Batch objects to score; each row starts from a zero state.
        model_config, precision, device: how to build the model for a params dict.

    Returns:
        summarize(sums): loss_sum, correct, count, num_examples, num_batches, batch_loss_sum,
        loss, accuracy, tff_loss.
    """
    if isinstance(model_or_params, torch.nn.Module):
        model = model_or_params
    elif model_config is None:
        raise FedtextError("evaluate() needs model_config to score a params dict")
    else:
        model = cached_model(model_config, precision, device)
        load_params(model, model_or_params)
    first = next(model.parameters())
    was_training = model.training
    model.eval()
    totals = torch.zeros(len(METRIC_SUMS), dtype=torch.float64, device=first.device)
    for b in batches:
        b = Batch(*(t.to(first.device) for t in b))
        logits, _ = model(b.x)  # (B, T, V)
        totals += batch_sums(logits, b)[1]
    model.train(was_training)
    return summarize(sums_to_dict(totals))


def evaluate_client(global_params: Params, client_data: ClientData, config: ClientConfig,
                    seed: int) -> dict:
    """The global model's metrics on one client: one pass over (epoch 0 of) its data, capped
    at config.max_batches. Top-level and picklable, like client_update."""
    batches = epoch_batches(client_data, 0, seed, config.max_batches)
    return evaluate(global_params, batches, config.model, config.precision, config.device)


def federated_evaluate(params: Params, clients: Sequence[tuple[Any, ClientData]],
                       config: ClientConfig, backend=None, seed: int = 0,
                       percentiles: Sequence[float] = PERCENTILES) -> dict:
    """Score `params` on each client and summarize over clients.

    Args:
        params: the global model.
        clients: (client_id, client_data) pairs, as for FederatedAlgorithm.apply.
        config: model, precision, device and max_batches (the training fields are unused).
        backend: where to run evaluate_client (default: this process, in order).
        seed: passed, as client i's seed = seed + i, to callable client_data.
        percentiles: which percentiles of the per-client loss and accuracy to report.

    Returns:
        {"loss", "accuracy", "tff_loss", "chars", "num_examples", "clients": pooled over all
        clients; "unweighted_loss", "unweighted_accuracy": plain means over clients with data;
        "loss_percentiles", "accuracy_percentiles": {p: value}; "client_metrics": per client}.
    """
    clients = list(clients)
    if not clients:
        raise FedtextError("federated evaluation needs at least one client")
    backend = backend or SequentialBackend()
    jobs = [{"client_data": data, "seed": seed + i} for i, (_, data) in enumerate(clients)]
    results = backend.map(evaluate_client, jobs,
                          shared={"global_params": params, "config": config})
    pooled = summarize({k: sum(r[k] for r in results) for k in METRIC_SUMS})
    scored = [r for r in results if r["count"] > 0]  # clients without text have no loss
    losses = np.array([r["loss"] for r in scored])
    accs = np.array([r["accuracy"] for r in scored])

    def pct(v):
        return {p: float(np.percentile(v, p)) if len(v) else float("nan") for p in percentiles}

    return {
        "loss": pooled["loss"], "accuracy": pooled["accuracy"], "tff_loss": pooled["tff_loss"],
        "chars": pooled["count"], "num_examples": pooled["num_examples"],
        "clients": len(results),
        "unweighted_loss": float(losses.mean()) if len(scored) else float("nan"),
        "unweighted_accuracy": float(accs.mean()) if len(scored) else float("nan"),
        "loss_percentiles": pct(losses), "accuracy_percentiles": pct(accs),
        "client_metrics": [{"client_id": cid, **r} for (cid, _), r in zip(clients, results)],
    }
