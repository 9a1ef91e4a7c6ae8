"""Arithmetic on model parameters, the one currency of the federated code.

Params are a plain `dict[str, Tensor]` (a model's `state_dict`). Every function here is pure:
it returns new tensors and never writes into its inputs, so a `ServerState` holding params can
be checkpointed, compared and passed between processes as a value (FedJAX's `tree_util`).

    zeros_like, add, sub, scale, weighted_mean, global_norm, clip_by_global_norm
    flatten / unflatten   one contiguous vector <-> params, for code that wants a single buffer
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Params = dict[str, torch.Tensor]


def zeros_like(p: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in p.items()}


def full_like(p: Params, value: float) -> Params:
    return {k: torch.full_like(v, value) for k, v in p.items()}


def clone(p: Params) -> Params:
    """A detached copy (the server keeps its own params, whatever the caller does to theirs)."""
    return {k: v.detach().clone() for k, v in p.items()}


def add(a: Params, b: Params) -> Params:
    return {k: a[k] + b[k] for k in a}


def sub(a: Params, b: Params) -> Params:
    return {k: a[k] - b[k] for k in a}


def scale(p: Params, s: float) -> Params:
    return {k: v * s for k, v in p.items()}


def weighted_mean(ps: Sequence[Params], weights: Sequence[float]) -> Params:
    """sum_i w_i p_i / sum_i w_i, accumulated in one buffer per key (no stacking of clients).

    Raises:
        ValueError: no inputs, a negative weight, or weights summing to zero.
    """
    if len(ps) == 0 or len(ps) != len(weights):
        raise ValueError(f"need one weight per params dict, got {len(ps)} and {len(weights)}")
    total = float(sum(weights))
    if any(w < 0 for w in weights) or not total > 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    keys = list(ps[0])
    out = [ps[0][k] * (weights[0] / total) for k in keys]
    for p, w in zip(ps[1:], weights[1:]):
        torch._foreach_add_(out, [p[k] for k in keys], alpha=w / total)
    return dict(zip(keys, out))


def global_norm(p: Params) -> float:
    """sqrt(sum of squares of every entry), the L2 norm of the flattened params."""
    # Accumulate in float64 (no float64 copy of the params: 20x faster than v.double()).
    return math.sqrt(sum(float(torch.linalg.vector_norm(v, dtype=torch.float64)) ** 2
                         for v in p.values()))


def nonfinite(p: Params) -> list[str]:
    """The names of the tensors that hold a NaN or an inf, in p's order ([] = all finite).

    One min/max pass per tensor (NaN propagates into both, an inf shows in one): no
    temporary, unlike torch.isfinite(v).all(), which is ~20x slower on a 3M-entry CPU tensor
    and ran on every client's delta and the round's params.
    """
    bad = []
    for k, v in p.items():
        if v.numel() and v.is_floating_point():
            lo, hi = torch.aminmax(v)
            if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
                bad.append(k)
    return bad


def clip_by_global_norm(p: Params, max_norm: float) -> tuple[Params, float]:
    """Scale p down to global norm <= max_norm. Returns (clipped, norm before clipping)."""
    norm = global_norm(p)
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return scale(p, factor), norm


def flatten(p: Params) -> torch.Tensor:
    """All entries in key order as one 1-D vector (a copy)."""
    return torch.cat([v.reshape(-1) for v in p.values()])


def unflatten(vec: torch.Tensor, like: Params) -> Params:
    """Inverse of `flatten`: views of `vec` shaped like `like`'s tensors."""
    sizes = [v.numel() for v in like.values()]
    if vec.numel() != sum(sizes):
        raise ValueError(f"vector has {vec.numel()} entries, params have {sum(sizes)}")
    return {k: t.view_as(v) for (k, v), t in zip(like.items(), vec.split(sizes))}


def assert_same_structure(a: Params, b: Params, what: str = "params") -> None:
    """Raise ValueError naming the first mismatched key or shape."""
    if a.keys() != b.keys():
        missing, extra = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        raise ValueError(f"{what}: missing keys {missing}, unexpected keys {extra}")
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(f"{what}: {k} has shape {tuple(b[k].shape)}, "
                             f"expected {tuple(a[k].shape)}")
