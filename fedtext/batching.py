"""Client text -> training batches (the tutorial's preprocessing, and a padded + masked variant)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Batch(NamedTuple):
    x: torch.Tensor  # (B, T) int64 input ids
    y: torch.Tensor  # (B, T) int64 target ids (PAD_ID where padded)
    mask: torch.Tensor  # (B, T) bool: True where the target is counted in loss and accuracy
