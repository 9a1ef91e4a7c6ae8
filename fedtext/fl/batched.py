"""A round's clients trained together: G calls of `client_update` as one grouped training loop.

    results = batched_client_updates(global_params, client_datas, config, seeds)
    # == [client_update(global_params, d, config, s) for d, s in zip(client_datas, seeds)]
    #    within float rounding (float32: ~1e-6 relative on each delta; float64: ~1e-15)

For rounds of many small clients on a GPU, one client at a time leaves the GPU idle (a GRU 256
step on 8 sequences is a few microseconds of work per kernel launch). Here the G clients'
weights are stacked ((G, *shape) per tensor, fedtext.model.grouped) and every local step
trains all of them at once, FedJAX's `for_each_client` idea without vmap: our recurrences are
custom autograd Functions vmap can't batch, so the grouped model is plain batched matmuls.

Clients have different numbers of batches, so the step count is padded:

    step s of the group = batch s of every client that has one (epochs concatenated, each
    capped at max_batches, exactly as client_update iterates them); rows and time steps of
    smaller batches are padding with mask False
    loss = sum_g loss_g (each the client's own masked mean): d loss / d W[g] is client g's grad
    a client that has no batch s takes no step: its weights and optimizer state are kept
    exactly (torch.where), and its metrics add nothing

The client optimizers are CLIENT_OPTIMIZERS' torch.optim.SGD / Adam / Adagrad written out on
the stacked tensors with the same update rules and hyperparameters (torch's single-tensor
code), with per-client step counts for Adam's bias correction. FedProx adds mu (w - w_global)
to the gradient, as client_update does.

What differs from client_update: the float summation order (bmm vs mm, sums over (T, B) vs
(B, T)), so float32 results agree to ~1e-6 relative, float64 to ~1e-15; `correct` can differ
only where two logits tie within that rounding. Precision bf16 is not offered (fp32 only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from fedtext.data.batching import Batch
from fedtext.errors import FedtextError
from fedtext.fl.client import (
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

# ---- the client optimizers on stacked (G, ...) tensors ---------------------------------------


class GroupOptimizer(NamedTuple):
    """init(params) -> state; update(params, grads, state, step) -> (new params, new state).

    params, grads: lists of (G, ...) tensors; state: {name: list aligned with params}; step:
    (G,) float64, the 1-based count of the step each client is taking. Pure: returns new
    tensors (the caller keeps the old ones of clients that take no step)."""

    init: Callable
    update: Callable


def sgd(lr: float, momentum: float = 0.0) -> GroupOptimizer:
    """torch.optim.SGD(lr, momentum): buf = momentum * buf + grad; w -= lr * buf (buf starts
    at 0, which equals torch's buf = grad on the first step)."""
    def init(params):
        return {"buf": [torch.zeros_like(p) for p in params]} if momentum else {}

    def update(params, grads, state, step):
        del step
        if momentum:
            grads = [b * momentum + g for b, g in zip(state["buf"], grads)]
            state = {"buf": grads}
        return [p.add(d, alpha=-lr) for p, d in zip(params, grads)], state

    return GroupOptimizer(init, update)


def adam(lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7) -> GroupOptimizer:
    """torch.optim.Adam(lr, eps=1e-7) (Keras' epsilon), with each client's own step count."""
    def init(params):
        return {"m": [torch.zeros_like(p) for p in params],
                "v": [torch.zeros_like(p) for p in params]}

    def update(params, grads, state, step):
        step_size = lr / (1 - b1 ** step)  # (G,) float64, as torch's Python floats
        bc2_sqrt = (1 - b2 ** step).sqrt()
        new_p, new_m, new_v = [], [], []
        for p, g, m, v in zip(params, grads, state["m"], state["v"]):
            shape = (-1,) + (1,) * (p.dim() - 1)  # per client, broadcast over the weight
            m = torch.lerp(m, g, 1 - b1)
            v = (v * b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / bc2_sqrt.to(p.dtype).view(shape)).add_(eps)
            new_p.append(p - step_size.to(p.dtype).view(shape) * m / denom)
            new_m.append(m)
            new_v.append(v)
        return new_p, {"m": new_m, "v": new_v}

    return GroupOptimizer(init, update)


def adagrad(lr: float, initial_accumulator_value: float = 0.1,
            eps: float = 1e-7) -> GroupOptimizer:
    """torch.optim.Adagrad(lr, initial_accumulator_value=0.1, eps=1e-7) (Keras' defaults)."""
    def init(params):
        return {"sum": [torch.full_like(p, initial_accumulator_value) for p in params]}

    def update(params, grads, state, step):
        del step
        sums = [s.addcmul(g, g) for s, g in zip(state["sum"], grads)]
        new_p = [p.addcdiv(g, s.sqrt().add_(eps), value=-lr)
                 for p, g, s in zip(params, grads, sums)]
        return new_p, {"sum": sums}

    return GroupOptimizer(init, update)


def group_optimizer(config: ClientConfig) -> GroupOptimizer:
    """The GroupOptimizer computing what CLIENT_OPTIMIZERS[config.optimizer] computes."""
    if config.optimizer == "sgd":
        return sgd(config.lr, config.momentum)
    if config.optimizer == "adam":
        return adam(config.lr)
    if config.optimizer == "adagrad":
        return adagrad(config.lr)
    raise FedtextError(f"batched clients have no {config.optimizer!r} optimizer "
                       "(sgd, adam, adagrad): use another backend")


def check_config(config: ClientConfig) -> None:
    """FedtextError for what batched training doesn't do (the run's problem, not a client's)."""
    if config.model is None:
        raise FedtextError("ClientConfig.model is not set: which architecture to train")
    if config.compute.precision != "fp32":
        raise FedtextError(f"batched clients compute in fp32 only, not precision "
                           f"{config.compute.precision!r}: use another backend for bf16")
    group_optimizer(config)


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
    """Per-client batch lists -> x, y (S, G, B, T) int64, mask (S, G, B, T), active (S, G),
    padded to the largest B and T; moved to the device in one copy each."""
    S, G = max(map(len, steps)), len(steps)
    B = max(b.x.shape[0] for st in steps for b in st)
    T = max(b.x.shape[1] for st in steps for b in st)
    x = torch.zeros(S, G, B, T, dtype=torch.int64)
    y = torch.zeros(S, G, B, T, dtype=torch.int64)
    mask = torch.zeros(S, G, B, T, dtype=torch.bool)
    active = torch.zeros(S, G, dtype=torch.bool)
    for g, st in enumerate(steps):
        for s, b in enumerate(st):
            rows, cols = b.x.shape
            x[s, g, :rows, :cols], y[s, g, :rows, :cols] = b.x, b.y
            mask[s, g, :rows, :cols] = b.mask
            active[s, g] = True
    return tuple(t.to(device, non_blocking=True) for t in (x, y, mask, active))


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


def _keep(active: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """new for the clients that took this step (active (G,)), old (exactly) for the others."""
    return torch.where(active.view((-1,) + (1,) * (old.dim() - 1)), new, old)


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
    dev, dtype = torch.device(config.device), DTYPES[config.dtype]
    start = {k: v.detach().to(dev, dtype) for k, v in global_params.items()}  # FedProx anchor
    W = [w.requires_grad_() for w in stack(start, G).values()]  # (G, *shape) each
    opt = group_optimizer(config)
    state = opt.init([w.detach() for w in W])
    taken = torch.zeros(G, dtype=torch.float64, device=dev)  # steps each client has taken
    totals = torch.zeros(G, len(METRIC_SUMS), dtype=torch.float64, device=dev)
    mu = config.prox_mu
    if any(steps):
        xs, ys, masks, actives = _stack_steps(steps, dev)
        for x, y, mask, active in zip(xs, ys, masks, actives):
            logits = grouped_forward(dict(zip(keys, W)), x, config.model)  # (G, T, B, V)
            loss, sums = group_batch_sums(logits, y, mask)
            grads = torch.autograd.grad(loss.sum(), W)  # client g's own grads in row g
            with torch.no_grad():
                if mu:  # d/dw of mu/2 ||w - w_global||^2
                    grads = [g.add(w - start[k], alpha=mu) for g, w, k in zip(grads, W, keys)]
                new_w, new_state = opt.update([w.detach() for w in W], grads, state,
                                              taken + 1)
                for w, nw in zip(W, new_w):
                    w.copy_(_keep(active, nw, w))
                state = {n: [_keep(active, a, b) for a, b in zip(new_state[n], state[n])]
                         for n in state}
                taken += active
                totals += sums * active.unsqueeze(1)
    results = []
    for g, row in enumerate(totals.cpu()):  # the one host sync of the group
        metrics = summarize(sums_to_dict(row))
        glob = list(global_params.values())
        local = [w[g].detach().to(t.device, t.dtype) for w, t in zip(W, glob)]
        delta = dict(zip(keys, torch._foreach_sub(glob, local)))  # global - local, fresh
        results.append(ClientResult(delta, float(metrics["count"]), metrics))
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
