"""GRU recurrences: the time loop of fedtext.model.GRU.

recurrence(xp, h0, w_hh, b_hh, reset_after) takes the input projections xp (T, B, 3H) (already
holding b_ih) and returns all hidden states (T, B, H). Gate order is torch's [r|z|n].

  reset_after=True (torch.nn.GRU):   n = tanh(x_n + r * (W_hn h + b_hn))
  reset_after=False (TF1-era Keras): n = tanh(x_n + (r * h) W_hn^T)
"""

from __future__ import annotations

import torch


def reference_recurrence(xp, h0, w_hh, b_hh, reset_after: bool = True):
    """The plain step-by-step definition, differentiated by autograd. Slow; the ground truth."""
    H = h0.shape[-1]
    h, out = h0, []
    for t in range(xp.shape[0]):
        x_r, x_z, x_n = xp[t].split(H, dim=-1)
        if reset_after:
            g = h @ w_hh.t() + b_hh  # (B, 3H)
            g_r, g_z, g_n = g.split(H, dim=-1)
            r, z = torch.sigmoid(x_r + g_r), torch.sigmoid(x_z + g_z)
            n = torch.tanh(x_n + r * g_n)
        else:
            g = h @ w_hh[: 2 * H].t()  # (B, 2H)
            g_r, g_z = g.split(H, dim=-1)
            r, z = torch.sigmoid(x_r + g_r), torch.sigmoid(x_z + g_z)
            n = torch.tanh(x_n + (r * h) @ w_hh[2 * H:].t())
        h = (1 - z) * n + z * h
        out.append(h)
    return torch.stack(out)


def recurrence(xp, h0, w_hh, b_hh, reset_after: bool = True):
    return reference_recurrence(xp, h0, w_hh, b_hh, reset_after)
