"""Client-to-server update compression: an encode/decode pair around the aggregator.

    [compression] method = "8" | "4" | "2"      uniform stochastic quantization to b bits
                  rotation = true               ... after a random Hadamard rotation
                  method = "topk"               top-k sparsification (topk_fraction of the
                  error_feedback = true         coordinates), optionally with error feedback

Quantization (Suresh et al. 2017, "Distributed Mean Estimation with Limited Communication";
TFF's `compression_aggregator` / `stochastic discretization`): per tensor, with its min m and
max M and L = 2^b - 1 levels of width s = (M - m) / L, each x goes to level floor((x - m) / s
+ u), u ~ U[0, 1): the decoded value m + s * level is unbiased, E = x, with error below s.
The random rotation x -> H D x (D random signs, H the normalized Walsh-Hadamard matrix, the
tensor zero-padded to a power of two) spreads the mass over the coordinates first, so the
range (M - m) shrinks and the error with it; the decoder applies D H (H is its own inverse).
Upload: b bits per coordinate (of the padded length, with rotation) + 8 bytes (m, M) per
tensor.

Top-k keeps the k = ceil(fraction * D) largest |x| of the whole update (biased: it claims
nothing else), uploading k values and k int32 indices. With error feedback (Stich et al.
2018, "Sparsified SGD with Memory") each client adds what it did not send last time before
choosing, and keeps the rest: the residuals are per-client state (one update's size per client
that ever took part: for the 4M-parameter tutorial model, 16 MB each), kept in the server
state here so that resume stays exact.

The random draws use a generator seeded by (seed, round, client position): the same on every
backend, and shared by encoder and decoder as TFF's shared seeds are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from fedtext.errors import FedtextError

_TAG = 7  # SeedSequence word
METHODS = ("8", "4", "2", "topk")


@dataclass(frozen=True)
class CompressionConfig:
    """[compression]: what each client uploads (default: its update in float32)."""

    method: str | None = field(default=None, metadata={
        "flag": "compression", "metavar": "8|4|2|topk", "help": "quantize updates to 8, 4 or "
        "2 bits (unbiased), or keep the top-k coordinates; default: float32"})
    rotation: bool = field(default=False, metadata={
        "flag": "compression-rotation", "help": "quantization: a random Hadamard rotation "
        "first (smaller error)"})
    topk_fraction: float = field(default=0.01, metadata={
        "help": "topk: the fraction of coordinates each client sends"})
    error_feedback: bool = field(default=False, metadata={
        "help": "topk: each client adds what it did not send before (per-client memory)"})

    def __post_init__(self):
        if self.method is not None and self.method not in METHODS:
            raise FedtextError(f"method must be one of {', '.join(METHODS)}, not "
                               f"{self.method!r}")
        if not 0 < self.topk_fraction <= 1:
            raise FedtextError(f"topk_fraction must be in (0, 1], not {self.topk_fraction}")
        if self.rotation and self.method in (None, "topk"):
            raise FedtextError("rotation goes with quantization (--compression 8|4|2)")
        if self.error_feedback and self.method != "topk":
            raise FedtextError("error_feedback goes with --compression topk")


def fp32_bytes(delta: dict) -> int:
    return sum(4 * v.numel() for v in delta.values())


def _generator(seed: int, round: int, position: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(
        [seed, round, position, _TAG]).generate_state(1)[0]))


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """The normalized Walsh-Hadamard transform of a power-of-two-long vector (its own
    inverse): log2(n) butterfly passes."""
    n = x.numel()
    y = x.reshape(-1).clone()
    h = 1
    while h < n:
        y = y.view(-1, 2, h)
        a, b = y[:, 0], y[:, 1]
        y = torch.stack([a + b, a - b], dim=1)
        h *= 2
    return y.reshape(n) / math.sqrt(n)


def quantize_roundtrip(x: torch.Tensor, bits: int, g: torch.Generator,
                       rotation: bool = False) -> tuple[torch.Tensor, int]:
    """(decoded x, upload bytes) of one tensor: stochastic b-bit quantization (module doc)."""
    flat = x.reshape(-1).double()
    n = flat.numel()
    if rotation:
        size = 1 << max(0, (n - 1).bit_length())
        signs = torch.randint(0, 2, (size,), generator=g, dtype=torch.int64) * 2 - 1
        padded = torch.zeros(size, dtype=torch.float64)
        padded[:n] = flat
        flat = _fwht(padded * signs)
    lo, hi = flat.min(), flat.max()
    levels = (1 << bits) - 1
    step = (hi - lo) / levels if hi > lo else torch.ones((), dtype=torch.float64)
    u = torch.rand(flat.shape, generator=g, dtype=torch.float64)
    q = torch.floor((flat - lo) / step + u).clamp(0, levels)  # the b-bit codes
    back = lo + q * step
    if rotation:
        back = (_fwht(back) * signs)[:n]
    return back.to(x.dtype).view_as(x), math.ceil(q.numel() * bits / 8) + 8


def topk_roundtrip(delta: dict, fraction: float, residual: torch.Tensor | None
                   ) -> tuple[dict, int, torch.Tensor]:
    """(decoded delta, upload bytes, the residual not sent) of top-k sparsification."""
    flat = torch.cat([v.reshape(-1) for v in delta.values()])
    if residual is not None:
        flat = flat + residual
    k = max(1, math.ceil(fraction * flat.numel()))
    idx = flat.abs().topk(k).indices
    sent = torch.zeros_like(flat)
    sent[idx] = flat[idx]
    out, offset = {}, 0
    for key, v in delta.items():
        out[key] = sent[offset:offset + v.numel()].view_as(v).clone()
        offset += v.numel()
    return out, 8 * k, flat - sent


def roundtrip(cfg: CompressionConfig, delta: dict, seed: int, round: int, position: int,
              residual: torch.Tensor | None = None):
    """(what the server decodes, upload bytes, the client's new residual or None)."""
    if cfg.method is None:
        return delta, fp32_bytes(delta), None
    if cfg.method == "topk":
        return topk_roundtrip(delta, cfg.topk_fraction,
                              residual if cfg.error_feedback else None)
    g = _generator(seed, round, position)
    out, total = {}, 0
    for k, v in delta.items():
        out[k], nbytes = quantize_roundtrip(v, int(cfg.method), g, cfg.rotation)
        total += nbytes
    return out, total, None
