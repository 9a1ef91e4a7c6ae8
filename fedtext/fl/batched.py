"""A round's clients trained together: G calls of `client_update` as one grouped training loop.

    results = batched_client_updates(global_params, client_datas, config, seeds)
    # == [client_update(global_params, d, config, s) for d, s in zip(client_datas, seeds)]
    #    within float rounding (tests/backends/test_batched.py says how close)

For rounds of many small clients on a GPU, one client at a time leaves the GPU idle (a GRU 256
step on 8 sequences is a few microseconds of work per kernel launch). Here the G clients'
weights are stacked ((G, *shape) per tensor, fedtext.model.grouped) and every local step
trains all of them at once: FedJAX's `for_each_client` idea without vmap (our recurrences are
custom autograd Functions vmap can't batch, so the grouped model is plain batched matmuls).

Clients have different numbers of batches, so the step count is padded:

    step s of the group = batch s of every client that has one (epochs concatenated, each
        capped at max_batches, exactly as client_update iterates them); rows and time steps
        of smaller batches are padding with mask False (counted nowhere)
    loss = sum_g loss_g, each the client's own masked mean: d loss / d W[g] is client g's grad
    clients are sorted by their number of batches, so those still training at step s are the
        first G_s: the step trains those rows (views of the stacked weights) and a client that
        is done is never written again, weights and optimizer state exactly as it left them

The optimizer is torch's own (CLIENT_OPTIMIZERS[config.optimizer]) over the stacked weights:
SGD, Adam and Adagrad are elementwise with scalar hyperparameters and one step count for the
clients still training, so each client's rows get exactly the update they would alone.
FedProx adds mu (w - w_global) to the gradient, as client_update does.

What differs from client_update is the float summation order (bmm vs mm, padded batches), so
float32 results agree to rounding (which, as between fedtext's one-by-one implementations,
grows over local steps), float64 to ~1e-13; `correct` can differ only where two logits tie
within that rounding. Precision bf16 is not offered (fp32 only).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtext.data.batching import Batch
from fedtext.errors import FedtextError
from fedtext.fl.client import (
    CLIENT_OPTIMIZERS,
    DTYPES,
    METRIC_SUMS,
    ClientConfig,
    ClientData,
    ClientResult,
    epoch_batches,
    summarize,
    sums_to_dict,
)
from fedtext.fl.params import Params
from fedtext.model.char_rnn import CharRNN
from fedtext.model.grouped import grouped_forward, stack

# Optimizers whose update is elementwise, with scalar hyperparameters and one step count: on
# stacked (G, ...) weights torch's own optimizer computes every client's update exactly as it
# would for that client alone. (One that reduces over a whole tensor, LARS or Adafactor say,
# would mix clients: not offered here.)
ELEMENTWISE = ("sgd", "adam", "adagrad")


def check_config(config: ClientConfig) -> None:
    """FedtextError for what batched training doesn't do (the run's problem, not a client's)."""
    if config.model is None:
        raise FedtextError("ClientConfig.model is not set: which architecture to train")
    if config.compute.precision != "fp32":
        raise FedtextError(f"batched clients compute in fp32 only, not precision "
                           f"{config.compute.precision!r}: use another backend for bf16")
    if config.optimizer not in ELEMENTWISE:
        raise FedtextError(f"batched clients train with {', '.join(ELEMENTWISE)}, not "
                           f"{config.optimizer!r}: use another backend")


# ---- a client's batches, checked --------------------------------------------------------------


def client_steps(client_data: ClientData, config: ClientConfig, seed: int) -> list[Batch]:
    """One client's batches in the order client_update steps on them (epoch after epoch, each
    capped at max_batches), checked: ids must be in the vocabulary, since a grouped lookup
    would read another client's table instead of failing."""
    V = config.model.vocab_size
    steps = []
    for epoch in range(config.local_epochs):
        for b in epoch_batches(client_data, epoch, seed, config.max_batches):
            b = Batch(*b)
            if not (b.x.dim() == 2 and b.x.shape == b.y.shape == b.mask.shape):
                raise FedtextError(f"a batch's x, y and mask must have one (B, T) shape, not "
                                   f"{tuple(b.x.shape)}, {tuple(b.y.shape)}, "
                                   f"{tuple(b.mask.shape)}")
            for name, ids in (("x", b.x), ("y", b.y)):
                if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < V):
                    raise FedtextError(f"batch {name} has ids outside [0, {V}): "
                                       f"{int(ids.min())}..{int(ids.max())}")
            steps.append(b)
    return steps


def _stack_steps(steps: Sequence[Sequence[Batch]], device: torch.device):
    """Per-client batch lists -> x, y (S, G, B, T) int64 and mask (S, G, B, T) bool, padded
    to the most batches (S) and the largest B and T; on the device in one copy each."""
    S, G = max(map(len, steps)), len(steps)
    B = max(b.x.shape[0] for st in steps for b in st)
    T = max(b.x.shape[1] for st in steps for b in st)
    x = torch.zeros(S, G, B, T, dtype=torch.int64)
    y = torch.zeros(S, G, B, T, dtype=torch.int64)
    mask = torch.zeros(S, G, B, T, dtype=torch.bool)
    for g, st in enumerate(steps):
        for s, b in enumerate(st):
            rows, cols = b.x.shape
            x[s, g, :rows, :cols], y[s, g, :rows, :cols] = b.x, b.y
            mask[s, g, :rows, :cols] = b.mask
    return tuple(t.to(device, non_blocking=True) for t in (x, y, mask))


def group_batch_sums(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor):
    """Per client: (mean loss (G,) with its graph, METRIC_SUMS (G, 6) float64), as
    client.batch_sums computes them for one client. logits (G, T, B, V); y, mask (G, B, T)."""
    G, T, B, V = logits.shape
    y, m = y.transpose(1, 2).reshape(G, T * B), mask.transpose(1, 2).reshape(G, T * B)
    flat = logits.reshape(G, T * B, V)
    nll = torch.nn.functional.cross_entropy(flat.reshape(-1, V), y.reshape(-1),
                                            reduction="none").view(G, T * B)
    m = m.to(logits.dtype)
    loss_sum = (nll * m).sum(1)  # (G,)
    count = m.sum(1)
    loss = loss_sum / count.clamp(min=1)  # exactly the client's (and CharRNN's) loss
    with torch.no_grad():
        correct = ((flat.argmax(-1) == y).to(logits.dtype) * m).sum(1)
        examples = mask.any(dim=2).sum(1).to(logits.dtype)  # sequences with a counted target
        sums = torch.stack([loss_sum, correct, count, examples, torch.ones_like(count),
                            loss * examples], dim=1)
    return loss, sums.double()


# ---- training -----------------------------------------------------------------------------------


def _param_shapes(config: ClientConfig) -> dict[str, tuple]:
    with torch.device("meta"):  # names and shapes only: no memory, no init
        model = CharRNN(config.model, init=False)
    return {k: tuple(v.shape) for k, v in model.named_parameters()}


def _first(n: int, weights: list, opt: torch.optim.Optimizer, config: ClientConfig):
    """The first n clients of `weights` and of `opt`'s state, as new leaves that are views
    (stepping them updates the stacked weights in place), with an optimizer over them."""
    opt.zero_grad()  # the old leaves' grads: not kept alive
    rows = [w.detach()[:n].requires_grad_() for w in weights]
    new_opt = CLIENT_OPTIMIZERS[config.optimizer](rows, config)
    for w, r in zip(weights, rows):  # per-element state (momentum, moments) sliced; step kept
        new_opt.state[r] = {k: v[:n] if torch.is_tensor(v) and v.shape == w.shape else v
                            for k, v in opt.state[w].items()}
    return rows, new_opt


def train_group(global_params: Params, steps: Sequence[Sequence[Batch]],
                config: ClientConfig) -> list[ClientResult]:
    """Train len(steps) clients from global_params, client g on the batches steps[g] (as
    client_steps gives them); returns what client_update would for each."""
    check_config(config)
    shapes = _param_shapes(config)
    if shapes != {k: tuple(v.shape) for k, v in global_params.items()}:
        missing = sorted(shapes.keys() - global_params.keys())
        extra = sorted(global_params.keys() - shapes.keys())
        raise FedtextError(f"params do not fit the model: missing {missing}, unexpected {extra}"
                           if missing or extra else "params do not fit the model's shapes")
    G, keys = len(steps), list(global_params)
    if G == 0:
        return []
    # Most batches first: the clients still training at step s are then the first G_s.
    order = sorted(range(G), key=lambda g: -len(steps[g]))
    steps = [steps[g] for g in order]
    dev, dtype = torch.device(config.device), DTYPES[config.dtype]
    start = [v.detach().to(dev, dtype) for v in global_params.values()]  # FedProx anchor
    stacked = list(stack(dict(zip(keys, start)), G).values())  # (G, *shape): every client
    weights = [w.requires_grad_() for w in stacked]
    opt = CLIENT_OPTIMIZERS[config.optimizer](weights, config)  # torch's, on stacked weights
    totals = torch.zeros(G, len(METRIC_SUMS), dtype=torch.float64, device=dev)
    mu = config.prox_mu
    if steps[0]:
        xs, ys, masks = _stack_steps(steps, dev)
        n = G
        for s in range(len(steps[0])):
            if len(steps[n - 1]) <= s:  # some clients are done: they take no more steps
                n = sum(len(st) > s for st in steps)
                weights, opt = _first(n, weights, opt, config)
            W = dict(zip(keys, weights))
            logits = grouped_forward(W, xs[s, :n], config.model)  # (n, T, B, V)
            loss, sums = group_batch_sums(logits, ys[s, :n], masks[s, :n])
            opt.zero_grad()
            loss.sum().backward()  # row g of each grad: client g's own gradient
            if mu:  # grad of mu/2 ||w - w_global||^2 is mu (w - w_global), as client_update
                grads = [w.grad for w in weights]
                torch._foreach_add_(grads, [w.detach() - w0 for w, w0 in zip(weights, start)],
                                    alpha=mu)
            opt.step()
            totals[:n] += sums
    results = [None] * G
    glob = list(global_params.values())
    for j, row in enumerate(totals.cpu()):  # the one host sync of the group
        metrics = summarize(sums_to_dict(row))
        local = [w[j].detach().to(t.device, t.dtype) for w, t in zip(stacked, glob)]
        delta = dict(zip(keys, torch._foreach_sub(glob, local)))  # global - local, fresh
        results[order[j]] = ClientResult(delta, float(metrics["count"]), metrics)
    return results


def batched_client_updates(global_params: Params, client_datas: Sequence[ClientData],
                           config: ClientConfig, seeds: Sequence[int]) -> list[ClientResult]:
    """`client_update` for G clients at once (see the module docstring).

    Args:
        global_params: the broadcast global model (state_dict of a CharRNN(config.model)).
        client_datas: each client's data (a list of Batch, or a callable (epoch, seed)).
        config: local training, model, dtype and device, as for client_update.
        seeds: each client's seed (passed to a callable client_data).

    Returns:
        [client_update(global_params, d, config, s) for d, s in zip(client_datas, seeds)],
        within float rounding.
    """
    if len(client_datas) != len(seeds):
        raise ValueError(f"{len(client_datas)} clients but {len(seeds)} seeds")
    check_config(config)
    steps = [client_steps(d, config, s) for d, s in zip(client_datas, seeds)]
    return train_group(global_params, steps, config)
