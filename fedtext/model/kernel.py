"""Build, choose, load and call the C recurrence kernels (fedtext/model/csrc/rnn_kernel.c).

One C source, compiled on first use with the system C compiler ($CC, else cc/gcc/clang) into
one shared library per SIMD variant, in the cache directory (keyed by a hash of the source,
the flags and the compiler's version; written atomically), and loaded with ctypes:

    variant   CPU needs                                  vector   bf16 dot products
    avx512    AVX-512 F/DQ/BW/VL, AVX2, FMA (x86-64)     16 fp32  with AVX512_BF16
    avx2      AVX2 + FMA (x86-64, e.g. every Zen)         8 fp32  -
    neon      aarch64                                     4 fp32  with ARM BF16 (BFDOT)
    scalar    any                                         1 fp32  -

The best variant this CPU runs is chosen at run time (csrc/cpu_probe.c reads the CPU's
features). FEDTEXT_KERNEL=avx512|avx2|neon|scalar forces one (an error if this CPU can't run
it), as does char_rnn.Compute(kernel=...), which wins over the variable; FEDTEXT_NO_KERNEL=1
disables the kernel. Without a kernel (no compiler, a failed build, FEDTEXT_NO_KERNEL) fedtext
runs the pure-PyTorch recurrences instead, with the same results (fedtext/model/recurrences.py
says so in one line). `kernel_info()` (`fedtext info`) reports what was found and chosen.

Tensors are passed as raw data pointers; the kernel's workspace (packed weights, carries) is a
per-thread buffer reused between calls. The kernel runs on torch.get_num_threads() threads of
torch's own OpenMP pool (pthreads where the compiler lacks -fopenmp). The big matmuls (input
projections, dW = dG^T H) stay in torch. Nothing here is a setting: the module-level state is
only caches of what was compiled, loaded and probed.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import threading
from importlib import resources
from pathlib import Path

import torch

from fedtext.errors import FedtextError
from fedtext.paths import atomic_path, cache_dir

VARIANTS = ("avx512", "avx2", "neon", "scalar")  # best first
_X86 = ("x86_64", "amd64", "i386", "i686")
_ARM = ("aarch64", "arm64")
_FLAGS = {
    "avx512": ["-DFEDTEXT_AVX512", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl",
               "-mavx2", "-mfma"],
    "avx2": ["-DFEDTEXT_AVX2", "-mavx2", "-mfma"],
    "neon": ["-DFEDTEXT_NEON"],
    "scalar": [],
}
# bf16 builds, used where the CPU has the feature (the ARM flags apply to the whole build):
_BF16_FLAGS = {"avx512": ["-mavx512bf16", "-DFEDTEXT_BF16"],
               "neon": ["-march=armv8.2-a+bf16", "-DFEDTEXT_BF16"]}
_BF16_FEATURE = {"avx512": "avx512_bf16", "neon": "arm_bf16"}
# Threads from torch's own OpenMP pool (the libgomp torch loaded: same soname), not threads of
# our own competing with torch's workers, which spin for a while after every parallel op.
_OPENMP_FLAGS = ["-fopenmp", "-DFEDTEXT_OPENMP"]
_NEEDS = {  # CPU features each variant's build may use anywhere
    "avx512": ("avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl"),
    "avx2": ("avx2", "fma"),
    "neon": ("neon",),
    "scalar": (),
}
# The bits of cpu_probe.c's fedtext_cpu_features(), in order; names as in /proc/cpuinfo.
FEATURE_BITS = ("avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_bf16",
                "neon", "arm_bf16")

_lock = threading.Lock()
_kernels: dict[str, Kernel | str] = {}  # variant -> loaded Kernel, or why it can't be
_local = threading.local()  # per-thread workspace and scratch buffers


class KernelUnavailable(RuntimeError):
    """The kernel can't run here (no compiler, a failed build, disabled): fall back."""


# ---------------------------------------------------------------- the compiler and builds


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


@functools.cache
def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return ""


def _source(name: str) -> bytes:
    return resources.files("fedtext.model").joinpath(f"csrc/{name}").read_bytes()


def _build(src_name: str, stem: str, flags: list[str]) -> Path:
    """Compile csrc/src_name with flags into the cache (once per source, flags and compiler)."""
    cc = _compiler()
    if cc is None:
        raise KernelUnavailable("no C compiler found (set $CC or install gcc)")
    src = _source(src_name)
    key = hashlib.sha256(src + " ".join(flags).encode() + _compiler_version(cc).encode()
                         + platform.machine().encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"{stem}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    src_path = out.with_suffix(".c")
    with atomic_path(src_path) as tmp:
        tmp.write_bytes(src)
    with atomic_path(out) as tmp:
        cmd = [cc, "-O3", "-std=gnu11", "-fPIC", "-shared", "-pthread", "-ffp-contract=fast",
               *flags, "-o", str(tmp), str(src_path)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            err = " ".join(res.stderr.split())[:300]
            raise KernelUnavailable(f"compiling {src_name} ({stem}) failed: {err}")
    return out


# ---------------------------------------------------------------- the CPU


@functools.cache
def cpu_features() -> frozenset[str]:
    """The SIMD features (FEATURE_BITS names) of this CPU, from cpu_probe.c; without a
    compiler, from /proc/cpuinfo (reporting only: no kernel runs without a compiler)."""
    try:
        lib = ctypes.CDLL(str(_build("cpu_probe.c", "cpu_probe", [])))
        bits = lib.fedtext_cpu_features()
        return frozenset(name for i, name in enumerate(FEATURE_BITS) if bits >> i & 1)
    except (KernelUnavailable, OSError):
        return _cpuinfo_features()


def _cpuinfo_features() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    m = re.search(r"^(?:flags|Features)\s*:(.*)$", text, re.M)
    found = set(m.group(1).split()) if m else set()
    if "asimd" in found:
        found.add("neon")
    if "bf16" in found and platform.machine().lower() in _ARM:
        found.add("arm_bf16")
    return frozenset(found & set(FEATURE_BITS))


@functools.cache
def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def bf16_native() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512_BF16 or ARM BF16)."""
    return bool({"avx512_bf16", "arm_bf16"} & cpu_features())


def cannot_run(variant: str) -> str | None:
    """Why this CPU can't run `variant` (None: it can)."""
    if variant not in VARIANTS:
        return f"unknown kernel variant {variant!r} (choose from {', '.join(VARIANTS)})"
    arch = platform.machine().lower()
    if variant in ("avx512", "avx2") and arch not in _X86:
        return f"the {variant} kernel needs an x86-64 CPU, this one is {arch}"
    if variant == "neon" and arch not in _ARM:
        return f"the neon kernel needs an ARM (aarch64) CPU, this one is {arch}"
    missing = [f for f in _NEEDS[variant] if f not in cpu_features()]
    if missing:
        return (f"this CPU ({cpu_model()}) lacks {', '.join(missing)}, needed by the {variant} "
                "kernel")
    return None


def runnable_variants() -> list[str]:
    """The variants this CPU can run, best first (whether they build is another matter)."""
    return [v for v in VARIANTS if cannot_run(v) is None]


# ---------------------------------------------------------------- loading


class Kernel:
    """One loaded variant of rnn_kernel.c; `bf16`: built with bf16 dot products (only where
    this CPU has them)."""

    def __init__(self, variant: str, path: Path):
        lib = ctypes.CDLL(str(path))
        p, i, z = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        lib.fedtext_rnn_workspace.argtypes = [i, i, i, i, i]
        lib.fedtext_rnn_workspace.restype = z
        lib.fedtext_gru_forward.argtypes = [i, i, i, i, i] + [p] * 6 + [i]
        lib.fedtext_gru_backward.argtypes = [i, i, i, i, i] + [p] * 8 + [i]
        lib.fedtext_lstm_forward.argtypes = [i, i, i, i] + [p] * 6 + [i]
        lib.fedtext_lstm_backward.argtypes = [i, i, i, i] + [p] * 9 + [i]
        lib.fedtext_rnn_variant.restype = ctypes.c_char_p
        lib.fedtext_rnn_threading.restype = ctypes.c_char_p
        assert lib.fedtext_rnn_variant().decode() == variant
        self.variant, self.lib, self.path = variant, lib, path
        self.threading = lib.fedtext_rnn_threading().decode()  # "openmp" or "pthreads"
        self.bf16 = bool(lib.fedtext_rnn_has_bf16())

    def __repr__(self) -> str:
        return f"Kernel({self.variant!r}, bf16={self.bf16}, threading={self.threading!r})"


def load(variant: str) -> Kernel:
    """The `variant` kernel, built on first use.

    Raises:
        FedtextError: this CPU can't run it (or there is no such variant).
        KernelUnavailable: it can't be built or loaded here (no compiler, say).
    """
    why = cannot_run(variant)
    if why:
        raise FedtextError(why)
    with _lock:
        if variant not in _kernels:
            _kernels[variant] = _try_load(variant)
        k = _kernels[variant]
    if isinstance(k, str):
        raise KernelUnavailable(k)
    return k


def _try_load(variant: str) -> Kernel | str:
    """Build and load `variant`, with the optional parts dropped one by one where this
    compiler can't build them (old compilers lack bf16 flags; Apple's clang, -fopenmp)."""
    bf16 = variant in _BF16_FLAGS and _BF16_FEATURE[variant] in cpu_features()
    extras = [_OPENMP_FLAGS, []]
    if bf16:
        extras = [_BF16_FLAGS[variant] + _OPENMP_FLAGS, _OPENMP_FLAGS, _BF16_FLAGS[variant], []]
    err = ""
    for extra in extras:
        try:
            return Kernel(variant, _build("rnn_kernel.c", f"rnn_kernel_{variant}",
                                          _FLAGS[variant] + extra))
        except (KernelUnavailable, OSError) as e:
            err = str(e)
    return err


def requested_variant(request: str = "auto") -> str:
    """What is asked for: `request` unless "auto", else $FEDTEXT_KERNEL, else "auto"."""
    if request == "auto":
        request = os.environ.get("FEDTEXT_KERNEL", "").strip().lower() or "auto"
    if request != "auto" and request not in VARIANTS:
        raise FedtextError(f"FEDTEXT_KERNEL / kernel must be auto or one of "
                           f"{', '.join(VARIANTS)}, not {request!r}")
    return request


def select(request: str = "auto") -> Kernel:
    """The kernel to run: the requested variant, or ("auto") the best one this CPU runs and
    this machine builds.

    Raises:
        FedtextError: a requested variant this CPU can't run.
        KernelUnavailable: no kernel here (FEDTEXT_NO_KERNEL, no compiler, failed builds).
    """
    if os.environ.get("FEDTEXT_NO_KERNEL", "") not in ("", "0"):
        raise KernelUnavailable("disabled by FEDTEXT_NO_KERNEL")
    request = requested_variant(request)
    if request != "auto":
        return load(request)
    reasons = []
    for variant in runnable_variants():
        try:
            return load(variant)
        except KernelUnavailable as e:
            reasons.append(str(e))
    raise KernelUnavailable("; ".join(dict.fromkeys(reasons)) or "no variant runs here")


def kernel_info(request: str = "auto") -> dict:
    """What fedtext found on this machine and which kernel it runs (for `fedtext info`)."""
    try:
        k, why = select(request), None
    except (KernelUnavailable, FedtextError) as e:
        k, why = None, str(e)
    cc = _compiler()
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "cpu_features": sorted(cpu_features()),
        "variants_runnable": runnable_variants(),
        "kernel": k.variant if k else None,
        "kernel_unavailable": why,
        "kernel_forced": os.environ.get("FEDTEXT_KERNEL") or None,
        "bf16_native": bf16_native(),
        "bf16_kernel": bool(k and k.bf16),
        "threads": torch.get_num_threads(),
        "kernel_threading": k.threading if k else None,
        "torch": torch.__version__,
        "compiler": (_compiler_version(cc).splitlines() or [cc])[0] if cc else None,
    }


# ---------------------------------------------------------------- buffers


def _buffer(name: str, nbytes: int) -> torch.Tensor:
    """A per-thread uint8 buffer of at least nbytes, 64-byte aligned, reused between calls
    (fresh pages cost a fault per 4 KB: several ms per training step at GRU 1024)."""
    buf = getattr(_local, name, None)
    if buf is None or buf.numel() < nbytes + 64:
        buf = torch.empty(nbytes + 64, dtype=torch.uint8)
        setattr(_local, name, buf)
    offset = -buf.data_ptr() % 64
    return buf[offset: offset + nbytes]


def _scratch(name: str, shape: tuple) -> torch.Tensor:
    """A per-thread float32 array for what never leaves a call."""
    n = 1
    for d in shape:
        n *= d
    return _buffer(name, 4 * n).view(torch.float32).view(shape)


def _workspace(k: Kernel, cell: int, T: int, B: int, H: int, bf16: bool) -> int:
    return _buffer("work", k.lib.fedtext_rnn_workspace(cell, T, B, H, int(bf16))).data_ptr()


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _check(rc: int) -> None:
    if rc != 0:
        raise RuntimeError(f"fedtext RNN kernel failed (code {rc})")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


_RESET_AFTER, _RESET_BEFORE, _LSTM = 0, 1, 2  # rnn_kernel.c's cell ids


# ---------------------------------------------------------------- autograd Functions


class GRUKernelFunction(torch.autograd.Function):
    """GRU recurrence on the C kernel; recurrences.gru_recurrence's contract:
    (xp (T, B, 3H), h0 (B, H), w_hh (3H, H), b_hh (3H,) or None) -> hs (T, B, H)."""

    @staticmethod
    def forward(ctx, xp, h0, w_hh, b_hh, reset_after, bf16, k, for_backward):
        T, B, H3 = xp.shape
        H = H3 // 3
        xp, w_hh = xp.contiguous(), w_hh.detach().contiguous()
        b_hh = b_hh.detach().contiguous() if reset_after else None
        hs = xp.new_empty(T + 1, B, H)  # hs[0] = h0
        # [r | z | n | hn or r*h]: kept for the backward, or, without one (evaluation), scratch.
        gates = xp.new_empty(T, B, 4 * H) if for_backward else _scratch("gates", (T, B, 4 * H))
        hs[0] = h0
        cell = _RESET_AFTER if reset_after else _RESET_BEFORE
        _check(k.lib.fedtext_gru_forward(
            int(reset_after), int(bf16), T, B, H, xp.data_ptr(), w_hh.data_ptr(), _ptr(b_hh),
            hs.data_ptr(), gates.data_ptr(), _workspace(k, cell, T, B, H, bf16), _threads()))
        ctx.save_for_backward(hs, gates, w_hh)
        ctx.k, ctx.reset_after, ctx.bf16 = k, reset_after, bf16
        return hs[1:]

    @staticmethod
    def backward(ctx, d_out):
        hs, gates, w_hh = ctx.saved_tensors
        k, reset_after, bf16 = ctx.k, ctx.reset_after, ctx.bf16
        T, B, H = d_out.shape
        d_out = d_out.contiguous()
        dxp = d_out.new_empty(T, B, 3 * H)
        dh0 = d_out.new_empty(B, H)
        # reset_after=True: dL/d(h W^T + b_hh) differs from dxp in the n block; used here only.
        dG = _scratch("dG", (T, B, 3 * H)) if reset_after else None
        cell = _RESET_AFTER if reset_after else _RESET_BEFORE
        _check(k.lib.fedtext_gru_backward(
            int(reset_after), int(bf16), T, B, H, d_out.data_ptr(), w_hh.data_ptr(),
            hs.data_ptr(), gates.data_ptr(), _ptr(dG), dxp.data_ptr(), dh0.data_ptr(),
            _workspace(k, cell, T, B, H, bf16), _threads()))
        h_prev = hs[:-1].reshape(T * B, H)
        if reset_after:
            dG2 = dG.view(T * B, 3 * H)
            # every step's weight gradient in one matmul
            return dxp, dh0, dG2.t() @ h_prev, dG2.sum(0), None, None, None, None
        dx2 = dxp.view(T * B, 3 * H)
        dw_rz = dx2[:, : 2 * H].t() @ h_prev
        dw_n = dx2[:, 2 * H:].t() @ gates[:, :, 3 * H:].reshape(T * B, H)  # dn~^T (r * h)
        return dxp, dh0, torch.cat([dw_rz, dw_n]), None, None, None, None, None


class LSTMKernelFunction(torch.autograd.Function):
    """LSTM recurrence on the C kernel; recurrences.lstm_recurrence's contract:
    (xp (T, B, 4H), h0, c0 (B, H), w_hh (4H, H)) -> hs (T, B, H), c_T (B, H)."""

    @staticmethod
    def forward(ctx, xp, h0, c0, w_hh, bf16, k, for_backward):
        T, B, H4 = xp.shape
        H = H4 // 4
        xp, w_hh = xp.contiguous(), w_hh.detach().contiguous()
        hs, cs = xp.new_empty(T + 1, B, H), xp.new_empty(T + 1, B, H)
        # [i | f | g | o | tanh(c)] per step
        gates = xp.new_empty(T, B, 5 * H) if for_backward else _scratch("gates", (T, B, 5 * H))
        hs[0], cs[0] = h0, c0
        _check(k.lib.fedtext_lstm_forward(
            int(bf16), T, B, H, xp.data_ptr(), w_hh.data_ptr(), hs.data_ptr(), cs.data_ptr(),
            gates.data_ptr(), _workspace(k, _LSTM, T, B, H, bf16), _threads()))
        ctx.save_for_backward(hs, cs, gates, w_hh)
        ctx.k, ctx.bf16 = k, bf16
        return hs[1:], cs[T]

    @staticmethod
    def backward(ctx, d_out, dc_n):
        hs, cs, gates, w_hh = ctx.saved_tensors
        k, bf16 = ctx.k, ctx.bf16
        T, B, H = d_out.shape
        d_out = d_out.contiguous()
        dc_n = None if dc_n is None else dc_n.contiguous()
        dxp = d_out.new_empty(T, B, 4 * H)
        dh0, dc0 = d_out.new_empty(B, H), d_out.new_empty(B, H)
        _check(k.lib.fedtext_lstm_backward(
            int(bf16), T, B, H, d_out.data_ptr(), _ptr(dc_n), w_hh.data_ptr(), cs.data_ptr(),
            gates.data_ptr(), dxp.data_ptr(), dh0.data_ptr(), dc0.data_ptr(),
            _workspace(k, _LSTM, T, B, H, bf16), _threads()))
        dw = dxp.view(T * B, 4 * H).t() @ hs[:-1].reshape(T * B, H)
        return dxp, dh0, dc0, dw, None, None, None
