"""Client work: local training on one client's batches, the one implementation every backend
calls (sequential, Ray workers, the Flower ClientApp).

    client_update(global_params, client_data, config, seed) -> ClientResult(delta, weight, metrics)

is pure and top-level (so it pickles): it reads `global_params`, never writes them, and returns
`delta = global - local` (FedJAX / TFF `model_delta_client_work`), the pseudo-gradient that
the aggregator averages and the server optimizer steps on.

Speed: each process (and thread) keeps one model per (ModelConfig, Compute, dtype, device) and
copies the global params into it, so a client costs the same as plain training on its batches,
plus two parameter-sized copies (in, and delta out).

Metrics follow TFF's `client_work` definitions and are kept as *sums*, so that totals over
clients are exact (sum of sums, never a mean of means). Each batch contributes the loss and
accuracy of the forward pass whose gradient takes its step ("pre-step"):

    loss_sum        sum over counted targets of the cross-entropy
    correct         counted targets where argmax(logits) == target
    count           counted targets ("tokens", the default client weight)
    num_examples    sequences with at least one counted target (TFF's NUM_EXAMPLES)
    num_batches     optimizer steps taken
    batch_loss_sum  sum over batches of (batch-mean loss * sequences in the batch); TFF reports
                    batch_loss_sum / num_examples as its round loss

`summarize(sums)` adds the means: loss = loss_sum / count, accuracy = correct / count and
tff_loss = batch_loss_sum / num_examples (equal to loss when every batch is full).
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from fedtext.data.batching import Batch
from fedtext.errors import FedtextError
from fedtext.fl.params import Params
from fedtext.fl.schedules import ScheduleConfig
from fedtext.model.char_rnn import CharRNN, Compute, ModelConfig, token_stats
from fedtext.registry import Registry

# A client's data: the same batches every epoch, or a picklable callable (epoch, seed) ->
# batches (fedtext.data.tasks.ClientData, which names the data instead of carrying it).
ClientData = Sequence[Batch] | Callable[[int, int], Iterable[Batch]]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # a rate the weights' dtype can hold
METRIC_SUMS = ("loss_sum", "correct", "count", "num_examples", "num_batches", "batch_loss_sum")

# Client optimizers: name -> (weights, ClientConfig) -> torch optimizer. A fresh one every round
# (TFF's client optimizers keep no state across rounds either).
CLIENT_OPTIMIZERS = Registry("client optimizer")
# w -= lr * (momentum buffer or grad): Keras / TFF SGD exactly.
CLIENT_OPTIMIZERS.register("sgd", lambda w, c: torch.optim.SGD(w, lr=c.lr, momentum=c.momentum))
# Keras' defaults for epsilon (and Adagrad's initial accumulator).
CLIENT_OPTIMIZERS.register("adam", lambda w, c: torch.optim.Adam(w, lr=c.lr, eps=1e-7))
CLIENT_OPTIMIZERS.register("adagrad", lambda w, c: torch.optim.Adagrad(
    w, lr=c.lr, initial_accumulator_value=0.1, eps=1e-7))


@dataclass(frozen=True)
class ClientConfig:
    """[client]: local training. The last four fields are filled in by the run (from the model
    it trains and where it runs), not from TOML."""

    optimizer: str = field(default="sgd", metadata={
        "flag": "client-optimizer", "choices": CLIENT_OPTIMIZERS.names,
        "help": "the clients' optimizer (fresh each round, as in TFF)"})
    lr: float = field(default=0.5, metadata={
        "flag": "client-lr", "help": "client learning rate (the tutorial's SGD(lr=0.5))"})
    momentum: float = field(default=0.0, metadata={
        "flag": "client-momentum", "help": "client SGD momentum (the tutorial: none)"})
    local_epochs: int = field(default=1, metadata={
        "help": "passes over a client's batches per round (the tutorial: 1)"})
    max_batches: int | None = field(default=5, metadata={
        "metavar": "B", "help": "batches per client and epoch (the tutorial's .take(5)); "
        "0 = all"})
    prox_mu: float = field(default=0.0, metadata={
        "help": "FedProx: adds mu/2 ||w - w_global||^2 to the loss; 0 = FedAvg"})
    schedule: ScheduleConfig = field(default=ScheduleConfig(), metadata={
        "flag_prefix": "client-lr"})
    # --- filled in by the run
    model: ModelConfig | None = field(default=None, metadata={"runtime": True})
    compute: Compute = field(default=Compute(), metadata={"runtime": True})
    dtype: str = field(default="float32", metadata={"runtime": True})  # or float64 (checks)
    device: str = field(default="cpu", metadata={"runtime": True})

    def __post_init__(self):
        CLIENT_OPTIMIZERS.check(self.optimizer, "optimizer")
        if self.dtype not in DTYPES:
            raise FedtextError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.local_epochs < 1:
            raise FedtextError(f"local_epochs must be >= 1, not {self.local_epochs}")
        if self.max_batches is not None and self.max_batches < 1:
            raise FedtextError(f"max_batches must be >= 1 (or none), not {self.max_batches}")
        if not (0 < self.lr <= FLOAT32_MAX):
            raise FedtextError(f"lr must be a finite number > 0 (at most {FLOAT32_MAX:.3g}, "
                               f"float32's largest), not {self.lr}")
        if not (0 <= self.prox_mu < math.inf):
            raise FedtextError(f"prox_mu must be a finite number >= 0, not {self.prox_mu}")
        if not 0 <= self.momentum < 1:
            raise FedtextError(f"momentum must be in [0, 1), not {self.momentum}")
        if self.momentum and self.optimizer != "sgd":
            raise FedtextError("momentum needs optimizer = 'sgd'")


class ClientResult(NamedTuple):
    delta: Params  # global - local, on the device and in the dtype of global_params
    weight: float  # counted targets; fed_avg re-weights with its `weighting`
    metrics: dict  # the METRIC_SUMS (see the module docstring)


# ---- one model per (thread, config): no deep copy per client ----------------------------------

_local = threading.local()


def cached_model(config: ModelConfig, compute: Compute = Compute(), dtype: str = "float32",
                 device: str = "cpu") -> CharRNN:
    """This thread's reusable CharRNN for `config` (its weights are whatever was loaded last).

    A cache, not a setting: what the model computes is all in the key.
    """
    cache = _local.__dict__.setdefault("models", {})
    key = (config, compute, dtype, device)
    if key not in cache:
        with torch.random.fork_rng(devices=[]):  # building must not move the caller's RNG
            model = CharRNN(config, init=False, compute=compute)  # weights: loaded before use
            cache[key] = model.to(device=device, dtype=DTYPES[dtype])
    return cache[key]


def load_params(model: torch.nn.Module, params: Params) -> list[torch.Tensor]:
    """Copy `params` into `model` in place; returns the model's parameters in `params`' order."""
    named = dict(model.named_parameters())
    if named.keys() != params.keys():
        missing, extra = sorted(named.keys() - params.keys()), sorted(params.keys() - named)
        raise FedtextError(f"params do not fit the model: missing {missing}, unexpected {extra}")
    mine = [named[k] for k in params]
    with torch.no_grad():
        torch._foreach_copy_(mine, list(params.values()))  # casts dtype / moves device as needed
    return mine


def epoch_batches(client_data: ClientData, epoch: int, seed: int,
                  max_batches: int | None = None) -> Iterable[Batch]:
    """The batches of one local epoch, capped at `max_batches`."""
    batches = client_data(epoch, seed) if callable(client_data) else client_data
    return itertools.islice(batches, max_batches)


def batch_sums(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss with its graph, the batch's METRIC_SUMS as a float64 (6,) tensor)."""
    loss_sum, correct, count = token_stats(logits, batch.y, batch.mask)
    loss = loss_sum / count.clamp(min=1)  # exactly CharRNN.forward's loss
    examples = batch.mask.any(dim=1).sum()  # sequences with >= 1 counted target
    with torch.no_grad():
        sums = torch.stack([loss_sum, correct, count, examples.to(count.dtype),
                            torch.ones_like(count), loss * examples])
    return loss, sums.double()


def summarize(sums: dict) -> dict:
    """METRIC_SUMS -> the same dict plus loss, accuracy and tff_loss (NaN where undefined)."""
    count, n = sums["count"], sums["num_examples"]
    nan = float("nan")
    return {**sums,
            "loss": sums["loss_sum"] / count if count else nan,
            "accuracy": sums["correct"] / count if count else nan,
            "tff_loss": sums["batch_loss_sum"] / n if n else nan}


def sums_to_dict(totals: torch.Tensor) -> dict:
    """A (6,) tensor of METRIC_SUMS -> {name: value}, counts as ints."""
    vals = totals.tolist()  # the one host sync of the client
    out = dict(zip(METRIC_SUMS, vals))
    for k in ("correct", "count", "num_examples", "num_batches"):
        out[k] = int(round(out[k]))
    return out


def client_update(global_params: Params, client_data: ClientData, config: ClientConfig,
                  seed: int) -> ClientResult:
    """Train a copy of the global model on one client's data; return its delta and metrics.

    Args:
        global_params: the broadcast global model (state_dict of a CharRNN(config.model)).
        client_data: a sequence of Batch, or a callable (epoch, seed) -> iterable of Batch.
        config: local training hyperparameters, the model's architecture and how to compute
            it (`lr` is this round's: the algorithm applies the schedule).
        seed: this client's seed (fedtext.fl.sampling.client_seed); only used by a callable
            client_data (training itself has no randomness).

    Returns:
        ClientResult(delta = global - local, weight = counted targets, metrics = summarize(sums)).
    """
    if config.model is None:
        raise FedtextError("ClientConfig.model is not set: which architecture to train")
    dev = torch.device(config.device)
    model = cached_model(config.model, config.compute, config.dtype, config.device)
    weights = load_params(model, global_params)
    mu = config.prox_mu
    start = [w.detach().clone() for w in weights] if mu else None  # FedProx anchor
    opt = CLIENT_OPTIMIZERS[config.optimizer](weights, config)
    totals = torch.zeros(len(METRIC_SUMS), dtype=torch.float64, device=dev)
    model.train()
    for epoch in range(config.local_epochs):
        for batch in epoch_batches(client_data, epoch, seed, config.max_batches):
            batch = Batch(*(t.to(dev, non_blocking=True) for t in batch))
            logits, _ = model(batch.x)  # (B, T, V)
            loss, sums = batch_sums(logits, batch)
            opt.zero_grad()
            loss.backward()
            if mu:  # grad of mu/2 ||w - w0||^2 is mu (w - w0): add it, skip the graph
                grads = [w.grad for w in weights]
                torch._foreach_add_(grads, torch._foreach_sub(weights, start), alpha=mu)
            opt.step()
            totals += sums
    metrics = summarize(sums_to_dict(totals))
    # delta = global - local, as fresh tensors (the model is reused by the next client).
    g = list(global_params.values())
    local = [w.detach().to(t.device, t.dtype) for w, t in zip(weights, g)]
    delta = dict(zip(global_params, torch._foreach_sub(g, local)))
    return ClientResult(delta, float(metrics["count"]), metrics)
