"""GRU and LSTM recurrences: the time loops of fedtext.model.char_rnn, and why they are fast.

`gru_recurrence(xp, h0, w_hh, b_hh, reset_after)` takes the input projections xp (T, B, 3H),
which already hold the input bias (char_rnn folds Embedding and W_ih into one (V, 3H) lookup
table), and returns all hidden states hs (T, B, H). Gate order is torch's [r|z|n]:

    reset_after=True (torch.nn.GRU, current Keras):  n = tanh(x_n + r * (h W_hn^T + b_hn))
    reset_after=False (the TF1-era Keras GRU):       n = tanh(x_n + (r * h) W_hn^T)
    r = sigmoid(x_r + h W_hr^T [+ b_hr]);  z = sigmoid(x_z + h W_hz^T [+ b_hz])
    h' = (1 - z) * n + z * h

`lstm_recurrence(xp, h0, c0, w_hh)` is the same for the LSTM, gates [i|f|g|o] (torch's
order) over xp (T, B, 4H) holding the one bias; it returns hs (T, B, H) and the last cell c_T:

    i, f, o = sigmoid(x + h W^T)[i, f, o];  g = tanh(x + h W^T)[g]
    c' = f * c + i * g;  h' = o * tanh(c')

Four implementations give the same numbers (tests/model/test_recurrences.py holds them to
nn.GRU / nn.LSTM / the reference within 1e-5):
- "reference": the equations above step by step under autograd. Slow; the ground truth.
- "torch": custom autograd Functions. The time loop does only what must be sequential (the
  recurrent matmul and the gates, forward; the gate gradients and dh @ W_hh, backward); every
  weight gradient is one large matmul after the loop (dW_hh = dG^T @ H over all T*B rows), where
  nn.GRU's CPU backward accumulates it one time step at a time.
- "kernel": the same design with the time loops in C (model/csrc/rnn_kernel.c: AVX-512, AVX2,
  NEON or scalar, chosen for the CPU by model/kernel.py), built on first use with the system C
  compiler and loaded with ctypes; the big matmuls stay in torch. Float32 on a CPU. Chosen
  automatically when it is available; otherwise "torch", with a one-line notice.
- "nn": torch's own kernels (torch._VF.gru / lstm, what nn.GRU / nn.LSTM call): cuDNN on a GPU,
  where they are exact for reset_after=True GRUs and LSTMs in fp32, so "auto" picks them there.

precision="bf16" runs the recurrent matmuls with bfloat16 operands (fp32 accumulation, state,
gates and master weights). On a CPU it needs native bf16 dot products: the avx512 kernel uses
AVX512_BF16's vdpbf16ps, the neon kernel ARM BF16's BFDOT. A CPU without them is refused
with a one-line FedtextError (the PyTorch bf16 path runs ~26x slower than fp32 there);
impl="torch" (asked for explicitly) and GPUs still run the PyTorch bf16 path. Tolerance: we
promise 2e-2 relative (max |error| / max |exact|) on outputs and gradients; measured vs the
float64 reference, 1.9e-3 to 4.7e-3 (test_bf16_tolerance: T 9, B 5, H 48, every cell).

Which implementation and precision run is the caller's to say (char_rnn.Compute, passed down
from the config): nothing here is process-wide, so every process computes what it was told.
`describe_compute` says what a given config runs here, for a run's provenance.
"""

from __future__ import annotations

import functools
import sys
from typing import NamedTuple

import torch

from fedtext.errors import FedtextError

IMPLS = ("auto", "kernel", "torch", "nn", "reference")
PRECISIONS = ("fp32", "bf16")
CELLS = ("gru", "lstm")


def reference_recurrence(xp, h0, w_hh, b_hh, reset_after: bool = True):
    """The plain step-by-step GRU, differentiated by autograd. Slow; the ground truth."""
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


def reference_lstm(xp, h0, c0, w_hh):
    """The plain step-by-step LSTM under autograd: (hs (T, B, H), c_T (B, H))."""
    h, c, out = h0, c0, []
    for t in range(xp.shape[0]):
        i, f, g, o = (xp[t] + h @ w_hh.t()).chunk(4, dim=-1)  # (B, H) each
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        out.append(h)
    return torch.stack(out), c


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


class _LSTM(torch.autograd.Function):
    """LSTM recurrence with a hand-written backward (the "torch" path)."""

    @staticmethod
    def forward(ctx, xp, h0, c0, w_hh, precision):
        T, B, H4 = xp.shape
        H = H4 // 4
        recurrent = _right_matmul(w_hh, precision)  # h -> h @ W_hh^T, (B, H) -> (B, 4H)
        hs, cs = xp.new_empty(T + 1, B, H), xp.new_empty(T + 1, B, H)
        gates = xp.new_empty(T, B, 5 * H)  # [i | f | g | o | tanh(c)] per step
        hs[0], cs[0] = h0, c0
        for t in range(T):
            gt = gates[t]
            torch.add(xp[t], recurrent(hs[t]), out=gt[:, : 4 * H])
            gt[:, : 2 * H].sigmoid_()
            gt[:, 2 * H: 3 * H].tanh_()
            gt[:, 3 * H: 4 * H].sigmoid_()
            i, f, g, o = gt[:, :H], gt[:, H: 2 * H], gt[:, 2 * H: 3 * H], gt[:, 3 * H: 4 * H]
            torch.addcmul(f * cs[t], i, g, out=cs[t + 1])  # c' = f c + i g
            torch.tanh(cs[t + 1], out=gt[:, 4 * H:])
            torch.mul(o, gt[:, 4 * H:], out=hs[t + 1])  # h' = o tanh(c')
        ctx.save_for_backward(hs, cs, gates, w_hh)
        ctx.precision = precision
        return hs[1:], cs[T]

    @staticmethod
    def backward(ctx, d_out, dc_n):
        hs, cs, gates, w_hh = ctx.saved_tensors
        T, B, H = d_out.shape
        through_w = _right_matmul(w_hh.t(), ctx.precision)  # dG -> dG @ W_hh: (B, 4H) -> (B, H)
        d_out = d_out.contiguous()
        dxp = d_out.new_empty(T, B, 4 * H)  # d loss / d (x + h W^T), per step
        dh = d_out.new_zeros(B, H)
        dc = d_out.new_zeros(B, H) if dc_n is None else dc_n.clone()
        for t in range(T - 1, -1, -1):
            dh = dh + d_out[t]
            g = gates[t]
            i, f, gg, o, tc = (g[:, k * H: (k + 1) * H] for k in range(5))
            dc = dc + dh * o * (1 - tc * tc)
            dx = dxp[t]
            torch.mul(dc * gg, i * (1 - i), out=dx[:, :H])
            torch.mul(dc * cs[t], f * (1 - f), out=dx[:, H: 2 * H])
            torch.mul(dc * i, 1 - gg * gg, out=dx[:, 2 * H: 3 * H])
            torch.mul(dh * tc, o * (1 - o), out=dx[:, 3 * H:])
            dh = through_w(dx)
            dc = dc * f
        dw = dxp.view(T * B, 4 * H).t() @ hs[:-1].reshape(T * B, H)  # all steps in one matmul
        return dxp, dh, dc, dw, None


class Path(NamedTuple):
    """Which implementation runs: impl ("nn", "kernel", "torch" or "reference"), the loaded
    kernel (impl "kernel" only) and, where "auto"/"kernel" fell back to "torch" (or, for an
    fp32 LSTM under "auto", to "nn"), why."""

    impl: str
    kernel: object = None  # fedtext.model.kernel.Kernel
    fallback: str | None = None


def resolve(device, cell: str = "gru", reset_after: bool = True, precision: str = "fp32",
            impl: str = "auto", dtype: torch.dtype = torch.float32, kernel: str = "auto") -> Path:
    """Which implementation computes this recurrence here.

    Args:
        device: where the tensors are.
        cell: "gru" or "lstm"; reset_after: the GRU variant.
        precision: "fp32" or "bf16"; impl: one of IMPLS; dtype: the weights' dtype (the
            kernel only does float32: float64 models, e.g. for checks, take the "torch" path).
        kernel: the kernel variant, "auto" = $FEDTEXT_KERNEL, else the best this CPU runs.

    Raises:
        FedtextError: bf16 on a CPU (or kernel variant) without bf16 dot products, or a
            kernel variant this CPU can't run.
    """
    if impl not in IMPLS or precision not in PRECISIONS or cell not in CELLS:
        raise ValueError(f"impl must be one of {IMPLS}, precision one of {PRECISIONS} and cell "
                         f"one of {CELLS}, not {impl!r}, {precision!r}, {cell!r}")
    device = torch.device(device)
    exact_nn = (cell == "lstm" or reset_after) and precision == "fp32"
    if impl == "reference":
        return Path("reference")
    if impl == "nn":
        if not exact_nn:
            raise ValueError("impl 'nn' (torch's own GRU / LSTM) computes reset_after=True GRUs "
                             "and LSTMs in fp32 only")
        return Path("nn")
    if impl == "auto" and device.type == "cuda" and exact_nn:
        return Path("nn")
    if device.type != "cpu" or impl == "torch" or dtype != torch.float32:
        return Path("torch")
    from fedtext.model import kernel as kmod

    try:
        k = kmod.select(kernel)
    except kmod.KernelUnavailable as e:
        if precision == "bf16" and not kmod.bf16_native():
            raise FedtextError(_no_bf16(f"this CPU ({kmod.cpu_model()}) has none")) from None
        # Without the kernel, the fastest PyTorch path: torch's own LSTM (4-5x the custom
        # Function on the CPUs of BENCHMARKS.md); for the GRU the custom Function (2-3x nn.GRU).
        fast = "nn" if cell == "lstm" and exact_nn and impl == "auto" else "torch"
        _notify_fallback(str(e), "torch's nn.LSTM" if fast == "nn" else
                         "the pure-PyTorch recurrence")
        return Path(fast, fallback=str(e))
    if precision == "bf16" and not k.bf16:
        why = (f"this CPU ({kmod.cpu_model()}) has none" if not kmod.bf16_native()
               else f"the {k.variant} kernel has none (avx512 and neon do, on CPUs with "
                    "AVX512_BF16 / ARM BF16)")
        raise FedtextError(_no_bf16(why))
    return Path("kernel", k)


def resolve_impl(device, cell: str = "gru", reset_after: bool = True, precision: str = "fp32",
                 impl: str = "auto", dtype: torch.dtype = torch.float32,
                 kernel: str = "auto") -> str:
    """resolve(...).impl: "nn", "kernel", "torch" or "reference"."""
    return resolve(device, cell, reset_after, precision, impl, dtype, kernel).impl


def _no_bf16(why: str) -> str:
    return (f"precision bf16 needs native bf16 dot products on a CPU and {why}; without them "
            "it would run ~26x slower than fp32: use precision fp32")


def gru_recurrence(xp, h0, w_hh, b_hh, reset_after: bool = True, precision: str = "fp32",
                   impl: str = "auto", kernel: str = "auto"):
    """All hidden states (T, B, H) of the GRU over input projections xp (T, B, 3H).
    b_hh (3H,) for reset_after=True; None (unused) for reset_after=False."""
    path = resolve(xp.device, "gru", reset_after, precision, impl, xp.dtype, kernel)
    if path.impl == "reference":
        return reference_recurrence(xp, h0, w_hh, b_hh, reset_after)
    if path.impl == "kernel":
        from fedtext.model.kernel import GRUKernelFunction

        # Under no_grad (evaluation, generation) nothing is kept for a backward.
        return GRUKernelFunction.apply(xp, h0, w_hh, b_hh, reset_after, precision == "bf16",
                                       path.kernel, torch.is_grad_enabled())
    if path.impl == "nn":
        raise ValueError("impl 'nn' runs whole layers: call it through char_rnn.GRU")
    if reset_after:
        return _GRUResetAfter.apply(xp, h0, w_hh, b_hh, precision)
    return _GRUResetBefore.apply(xp, h0, w_hh, precision)


def lstm_recurrence(xp, h0, c0, w_hh, precision: str = "fp32", impl: str = "auto",
                    kernel: str = "auto"):
    """All hidden states (T, B, H) and the last cell state (B, H) of the LSTM over input
    projections xp (T, B, 4H) (bias included)."""
    path = resolve(xp.device, "lstm", True, precision, impl, xp.dtype, kernel)
    if path.impl == "reference":
        return reference_lstm(xp, h0, c0, w_hh)
    if path.impl == "kernel":
        from fedtext.model.kernel import LSTMKernelFunction

        return LSTMKernelFunction.apply(xp, h0, c0, w_hh, precision == "bf16", path.kernel,
                                        torch.is_grad_enabled())
    if impl == "nn":
        raise ValueError("impl 'nn' runs whole layers: call it through char_rnn.LSTM")
    # (also "auto" without the kernel: nn.LSTM runs whole layers, not a recurrence alone)
    return _LSTM.apply(xp, h0, c0, w_hh, precision)


def describe_compute(model_config, compute, device="cpu") -> dict:
    """What a model of `model_config` computes with `compute` on `device`, for a run's
    metrics and provenance, e.g. {"cell": "gru", "reset_after": True, "impl": "kernel",
    "kernel": "avx512", "precision": "fp32", "threads": 2, "device": "cpu"}.

    Raises FedtextError where the model would (bf16 without native support, say), so a run
    can fail before its first round.
    """
    cell = model_config.cell
    path = resolve(device, cell, model_config.reset_after, compute.precision, compute.impl,
                   torch.float32, compute.kernel)
    out = {"cell": cell}
    if cell == "gru":
        out["reset_after"] = model_config.reset_after
    out |= {"impl": path.impl, "kernel": path.kernel.variant if path.kernel else None,
            "precision": compute.precision, "threads": torch.get_num_threads(),
            "device": str(torch.device(device))}
    if path.fallback:
        out["kernel_unavailable"] = path.fallback
    return out


@functools.cache  # one notice per process and reason, not one per batch
def _notify_fallback(reason: str, instead: str) -> None:
    print(f"fedtext: fast RNN kernel unavailable ({reason}); using {instead}", file=sys.stderr)
