"""Build, load and call the C GRU kernel (fedtext/model/csrc/gru_kernel.c).

The kernel is plain C with no build-time dependence on torch or Python: on first use it is
compiled with the system C compiler ($CC, else cc/gcc/clang) into the cache directory, keyed by
a hash of its source and the compiler's version, written atomically, and loaded with ctypes.
Tensors are passed as raw data pointers. If there is no compiler, the build fails, the CPU lacks
AVX-512, or FEDTEXT_NO_KERNEL=1 is set, `available()` is False and fedtext uses the
pure-PyTorch GRU (fedtext/model/recurrences.py) instead, which gives the same results.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from importlib import resources
from pathlib import Path

import torch

from fedtext.paths import atomic_path, cache_dir

_lib = None
_reason = None  # why the kernel is unavailable, once known
_lock = threading.Lock()
_local = threading.local()  # per-thread scratch for the packed weights


def _source() -> bytes:
    return resources.files("fedtext.model").joinpath("csrc/gru_kernel.c").read_bytes()


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _build() -> Path:
    """Compile the kernel into the cache (once per source + compiler) and return its path."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC or install gcc)")
    src = _source()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(src + version.encode() + platform.machine().encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"gru_kernel-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    src_path = out.with_suffix(".c")
    with atomic_path(src_path) as tmp:
        tmp.write_bytes(src)
    with atomic_path(out) as tmp:
        cmd = [cc, "-O3", "-fPIC", "-shared", "-pthread", "-o", str(tmp), str(src_path)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"compiling the GRU kernel failed: {res.stderr.strip()[:300]}")
    return out


def _load():
    global _lib, _reason
    with _lock:
        if _lib is not None or _reason is not None:
            return _lib
        try:
            if os.environ.get("FEDTEXT_NO_KERNEL", "") not in ("", "0"):
                raise RuntimeError("disabled by FEDTEXT_NO_KERNEL")
            if platform.machine() not in ("x86_64", "AMD64"):
                raise RuntimeError(f"needs an x86-64 CPU with AVX-512, not {platform.machine()}")
            lib = ctypes.CDLL(str(_build()))
            if not lib.fedtext_gru_cpu_ok():
                raise RuntimeError("this CPU lacks AVX-512")
            p, i = ctypes.c_void_p, ctypes.c_int
            lib.fedtext_gru_forward.argtypes = [i, i, i, p, p, p, p, p, p, i]
            lib.fedtext_gru_backward.argtypes = [i, i, i, p, p, p, p, p, p, p, p, p, i]
            _lib = lib
        except (OSError, RuntimeError) as e:
            _reason = str(e)
    return _lib


def available() -> bool:
    """Whether the compiled kernel can run here (builds it on first call)."""
    return _load() is not None


def unavailable_reason() -> str:
    _load()
    return _reason or ""


def _pack_buffer(H: int) -> torch.Tensor:
    """Scratch for the re-arranged W_hh: ceil(H/16) panels of 48*H floats, 64-byte aligned."""
    n = ((H + 15) // 16) * 48 * H
    buf = getattr(_local, "pack", None)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n + 16, dtype=torch.float32)
        _local.pack = buf
    offset = (-buf.data_ptr() // 4) % 16  # first 64-byte aligned float
    return buf[offset: offset + n]


def _scratch(name: str, shape: tuple) -> torch.Tensor:
    """A per-thread float32 buffer reused across calls: for arrays that never leave a call
    (fresh ones cost a page fault per 4 KB, several ms per training step at GRU 1024)."""
    n = 1
    for d in shape:
        n *= d
    buf = getattr(_local, name, None)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=torch.float32)
        setattr(_local, name, buf)
    return buf[:n].view(shape)


def _threads() -> int:
    return max(1, torch.get_num_threads())


class GRUKernelFunction(torch.autograd.Function):
    """reset_after=True GRU recurrence on the C kernel; same contract as recurrences."""

    @staticmethod
    def forward(ctx, xp, h0, w_hh, b_hh, for_backward=True):
        lib = _load()
        T, B, H3 = xp.shape
        H = H3 // 3
        xp, w_hh, b_hh = xp.contiguous(), w_hh.detach().contiguous(), b_hh.detach().contiguous()
        hs = xp.new_empty(T + 1, B, H)  # hs[0] = h0
        # [r | z | n | hn]: kept for the backward, or, without one (evaluation), scratch.
        gates = xp.new_empty(T, B, 4 * H) if for_backward else _scratch("gates", (T, B, 4 * H))
        hs[0] = h0
        lib.fedtext_gru_forward(T, B, H, xp.data_ptr(), w_hh.data_ptr(), b_hh.data_ptr(),
                                hs.data_ptr(), gates.data_ptr(), _pack_buffer(H).data_ptr(),
                                _threads())
        ctx.save_for_backward(hs, gates, w_hh)
        return hs[1:]

    @staticmethod
    def backward(ctx, d_out):
        lib = _load()
        hs, gates, w_hh = ctx.saved_tensors
        T, B, H = d_out.shape
        d_out = d_out.contiguous()
        dG = _scratch("dG", (T, B, 3 * H))  # d loss / d (h W_hh^T + b_hh); used here only
        dxp = d_out.new_empty(T, B, 3 * H)
        dh0 = d_out.new_empty(B, H)
        dh_buf = _scratch("dh", (B, H))
        lib.fedtext_gru_backward(T, B, H, d_out.data_ptr(), w_hh.data_ptr(), hs.data_ptr(),
                                 gates.data_ptr(), dG.data_ptr(), dxp.data_ptr(),
                                 dh0.data_ptr(), dh_buf.data_ptr(), _pack_buffer(H).data_ptr(),
                                 _threads())
        dG2 = dG.view(T * B, 3 * H)
        dw_hh = dG2.t() @ hs[:-1].reshape(T * B, H)  # every step's weight gradient in one matmul
        return dxp, dh0, dw_hh, dG2.sum(0), None
