"""GRU recurrences: the time loop of fedtext.model.char_rnn.GRU, and why it is fast.

`recurrence(xp, h0, w_hh, b_hh, reset_after)` takes the input projections xp (T, B, 3H), which
already hold b_ih (char_rnn folds Embedding and W_ih into one (V, 3H) lookup table), and
returns all hidden states hs (T, B, H). Gate order is torch's [r|z|n]:

    reset_after=True (torch.nn.GRU, current Keras):  n = tanh(x_n + r * (h W_hn^T + b_hn))
    reset_after=False (the TF1-era Keras GRU):       n = tanh(x_n + (r * h) W_hn^T)
    r = sigmoid(x_r + h W_hr^T [+ b_hr]);  z = sigmoid(x_z + h W_hz^T [+ b_hz])
    h' = (1 - z) * n + z * h

Three implementations give the same numbers (tests/test_gru.py holds them to nn.GRU):
- "reference": the equations above step by step under autograd. Slow; the ground truth.
- "torch": a custom autograd Function. The time loop does only what must be sequential (the
  recurrent matmul and the gates, forward; the gate gradients and dh @ W_hh, backward); every
  weight gradient is one large matmul after the loop (dW_hh = dG^T @ H over all T*B rows), where
  nn.GRU's CPU backward accumulates it one time step at a time.
- "kernel": the same design with the time loop in a small C kernel (model/csrc/gru_kernel.c,
  AVX-512, 2 threads), built on first use with the system C compiler and loaded with ctypes;
  the big matmuls stay in torch. reset_after=True, float32 only. Chosen automatically when it
  is available; otherwise "torch", with a one-line notice.
- "nn": torch's own GRU kernel (torch._VF.gru, what nn.GRU calls): cuDNN on a GPU, where it is
  exact for reset_after=True and fp32, so "auto" picks it on CUDA.
"bf16" precision runs the recurrent matmuls of the "torch" path in bfloat16 (fp32 state,
gates and master weights); tests hold it to its own looser tolerance.

Which implementation and precision run is the caller's to say (char_rnn.Compute, passed down
from the config): nothing here is process-wide, so every process computes what it was told.
"""

from __future__ import annotations

import functools
import sys

import torch

IMPLS = ("auto", "kernel", "torch", "nn", "reference")
PRECISIONS = ("fp32", "bf16")


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


def _right_matmul(w: torch.Tensor, precision: str):
    """f(a) = a @ w^T for the time loop's small (B, K) x (K, N) products, made fast once per
    sequence. On a CPU the weight goes to oneDNN's blocked layout: for B = 8 rows it runs ~1.7x
    faster than torch's default fp32 GEMM here (MKL repacks the whole weight on every call).
    bf16: the weight and each `a` in bfloat16, products returned in float32."""
    if precision == "bf16":
        wb = w.t().to(torch.bfloat16).contiguous()
        return lambda a: (a.to(torch.bfloat16) @ wb).float()
    if w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        wm = w.contiguous().to_mkldnn()
        return lambda a: torch._C._nn.mkldnn_linear(a.contiguous().to_mkldnn(), wm, None).to_dense()
    wt = w.t().contiguous()
    return lambda a: a @ wt


def _candidate_and_update_grads(dh, z, n, h_prev, dx):
    """Both variants' shared step of the backward, for h' = n + z (h - n), written into dx's
    n and z blocks: dn_pre = dh (1 - z)(1 - n^2), dz_pre = dh (h_prev - n) z (1 - z).
    Returns the dn_pre view."""
    H = dh.shape[-1]
    dn_pre = dx[:, 2 * H:]
    torch.mul(dh, 1 - z, out=dn_pre)
    dn_pre.mul_(1 - n * n)
    torch.mul(dh, h_prev - n, out=dx[:, H: 2 * H])
    dx[:, H: 2 * H].mul_(z * (1 - z))
    return dn_pre


class _GRUResetAfter(torch.autograd.Function):
    """reset_after=True recurrence with a hand-written backward (the "torch" path)."""

    @staticmethod
    def forward(ctx, xp, h0, w_hh, b_hh, precision):
        T, B, H3 = xp.shape
        H = H3 // 3
        recurrent = _right_matmul(w_hh, precision)  # h -> h @ W_hh^T, (B, H) -> (B, 3H)
        hs = xp.new_empty(T + 1, B, H)  # hs[0] = h0, hs[t+1] = h after step t
        gates = xp.new_empty(T, B, 4 * H)  # [r | z | n | hn] per step, for the backward
        hs[0] = h0
        for t in range(T):
            h = hs[t]
            g = recurrent(h)  # (B, 3H)
            g += b_hh
            gt = gates[t]
            rz = gt[:, : 2 * H]
            torch.add(xp[t, :, : 2 * H], g[:, : 2 * H], out=rz)
            rz.sigmoid_()
            hn = gt[:, 3 * H:]
            hn.copy_(g[:, 2 * H:])
            n = gt[:, 2 * H: 3 * H]
            torch.addcmul(xp[t, :, 2 * H:], gt[:, :H], hn, out=n)
            n.tanh_()
            # h' = n + z * (h - n)
            torch.addcmul(n, gt[:, H: 2 * H], h - n, out=hs[t + 1])
        ctx.save_for_backward(hs, gates, w_hh)
        ctx.precision = precision
        return hs[1:]

    @staticmethod
    def backward(ctx, d_out):
        hs, gates, w_hh = ctx.saved_tensors
        T, B, H = d_out.shape
        through_w = _right_matmul(w_hh.t(), ctx.precision)  # dG -> dG @ W_hh: dh via matmul
        d_out = d_out.contiguous()
        dxp = d_out.new_empty(T, B, 3 * H)  # d loss / d xp
        dG = d_out.new_empty(T, B, 3 * H)  # d loss / d (h W_hh^T + b_hh)
        dh = d_out.new_zeros(B, H)
        for t in range(T - 1, -1, -1):
            dh = dh + d_out[t]
            g = gates[t]
            r, z, n, hn = g[:, :H], g[:, H: 2 * H], g[:, 2 * H: 3 * H], g[:, 3 * H:]
            h_prev = hs[t]
            dx = dxp[t]
            # dn_pre = dh * (1 - z) * (1 - n^2)
            dn_pre = _candidate_and_update_grads(dh, z, n, h_prev, dx)
            # dr_pre = dn_pre * hn * r * (1 - r)
            torch.mul(dn_pre, hn, out=dx[:, :H])
            dx[:, :H].mul_(r * (1 - r))
            dg = dG[t]
            dg[:, : 2 * H].copy_(dx[:, : 2 * H])
            torch.mul(dn_pre, r, out=dg[:, 2 * H:])
            dh = torch.addcmul(through_w(dg), dh, z)  # (B, H)
        dG2 = dG.view(T * B, 3 * H)
        dw_hh = dG2.t() @ hs[:-1].reshape(T * B, H)  # one big matmul for all steps
        db_hh = dG2.sum(0)
        return dxp, dh, dw_hh, db_hh, None


class _GRUResetBefore(torch.autograd.Function):
    """reset_after=False recurrence (r multiplies h before the matmul), hand-written backward."""

    @staticmethod
    def forward(ctx, xp, h0, w_hh, precision):
        T, B, H3 = xp.shape
        H = H3 // 3
        by_rz = _right_matmul(w_hh[: 2 * H], precision)  # h -> h @ W_rz^T: (B, 2H)
        by_n = _right_matmul(w_hh[2 * H:], precision)  # rh -> rh @ W_n^T: (B, H)
        hs = xp.new_empty(T + 1, B, H)
        gates = xp.new_empty(T, B, 4 * H)  # [r | z | n | r*h]
        hs[0] = h0
        for t in range(T):
            h = hs[t]
            gt = gates[t]
            rz = gt[:, : 2 * H]
            torch.add(xp[t, :, : 2 * H], by_rz(h), out=rz)
            rz.sigmoid_()
            rh = gt[:, 3 * H:]
            torch.mul(gt[:, :H], h, out=rh)
            n = gt[:, 2 * H: 3 * H]
            torch.add(xp[t, :, 2 * H:], by_n(rh), out=n)
            n.tanh_()
            torch.addcmul(n, gt[:, H: 2 * H], h - n, out=hs[t + 1])
        ctx.save_for_backward(hs, gates, w_hh)
        ctx.precision = precision
        return hs[1:]

    @staticmethod
    def backward(ctx, d_out):
        hs, gates, w_hh = ctx.saved_tensors
        T, B, H = d_out.shape
        through_rz = _right_matmul(w_hh[: 2 * H].t(), ctx.precision)  # (B, 2H) -> (B, H)
        through_n = _right_matmul(w_hh[2 * H:].t(), ctx.precision)  # (B, H) -> (B, H)
        d_out = d_out.contiguous()
        dxp = d_out.new_empty(T, B, 3 * H)
        drh_all = d_out.new_empty(T, B, H)  # d loss / d (r * h), for dW_n
        dh = d_out.new_zeros(B, H)
        for t in range(T - 1, -1, -1):
            dh = dh + d_out[t]
            g = gates[t]
            r, z, n = g[:, :H], g[:, H: 2 * H], g[:, 2 * H: 3 * H]
            h_prev = hs[t]
            dx = dxp[t]
            dn_pre = _candidate_and_update_grads(dh, z, n, h_prev, dx)
            drh = drh_all[t]
            drh.copy_(through_n(dn_pre))  # (B, H)
            torch.mul(drh, h_prev, out=dx[:, :H])
            dx[:, :H].mul_(r * (1 - r))
            # dh_prev = dh * z + drh * r + [dr_pre, dz_pre] @ W_rz
            dh = through_rz(dx[:, : 2 * H]).addcmul_(dh, z).addcmul_(drh, r)
        dx2 = dxp.view(T * B, 3 * H)
        dw_rz = dx2[:, : 2 * H].t() @ hs[:-1].reshape(T * B, H)
        dw_n = dx2[:, 2 * H:].t() @ gates[:, :, 3 * H:].reshape(T * B, H)
        return dxp, dh, torch.cat([dw_rz, dw_n]), None


def resolve_impl(device: torch.device, reset_after: bool, precision: str = "fp32",
                 impl: str = "auto", dtype: torch.dtype = torch.float32) -> str:
    """Which implementation runs: "nn" (torch's own GRU kernel: cuDNN on a GPU), "kernel",
    "torch" or "reference". The kernel only does float32 weights (float64 models, e.g. for
    checks, take the "torch" path)."""
    if impl not in IMPLS or precision not in PRECISIONS:
        raise ValueError(f"impl must be one of {IMPLS} and precision one of {PRECISIONS}, "
                         f"not {impl!r}, {precision!r}")
    if impl == "reference":
        return "reference"
    exact_nn = reset_after and precision == "fp32"
    if impl == "nn" or (impl == "auto" and device.type == "cuda" and exact_nn):
        return "nn"
    if impl in ("auto", "kernel") and dtype != torch.float32:
        return "torch"
    if device.type == "cpu" and exact_nn and impl in ("auto", "kernel"):
        from fedtext.model import kernel

        if kernel.available():
            return "kernel"
        _notify_fallback(kernel.unavailable_reason())
    return "torch"


def recurrence(xp, h0, w_hh, b_hh, reset_after: bool = True, precision: str = "fp32",
               impl: str = "auto"):
    """All hidden states (T, B, H) of the GRU over input projections xp (T, B, 3H)."""
    which = resolve_impl(xp.device, reset_after, precision, impl, xp.dtype)
    if which == "reference":
        return reference_recurrence(xp, h0, w_hh, b_hh, reset_after)
    if which == "kernel":
        from fedtext.model import kernel

        # Under no_grad (evaluation, generation) nothing is kept for a backward.
        return kernel.GRUKernelFunction.apply(xp, h0, w_hh, b_hh, torch.is_grad_enabled())
    if reset_after:
        return _GRUResetAfter.apply(xp, h0, w_hh, b_hh, precision)
    return _GRUResetBefore.apply(xp, h0, w_hh, precision)


@functools.cache  # one notice per process and reason, not one per batch
def _notify_fallback(reason: str) -> None:
    print(f"fedtext: fast GRU kernel unavailable ({reason}); using the pure-PyTorch GRU",
          file=sys.stderr)
