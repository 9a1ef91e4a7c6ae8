"""Seconds per training step (forward, masked CE, backward, SGD) per recurrence path, next to
the step's FLOP limit on this machine.

    .venv/bin/python benchmarks/bench_gru.py                 # both sections, ~3 minutes
    .venv/bin/python benchmarks/bench_gru.py --repeats 3 --no-lstm
    .venv/bin/python benchmarks/bench_gru.py --emulate-avx2  # as on an AVX2-only CPU

GRU: the tutorial step, batch 8 x 100, Embedding 256 -> GRU 1024 -> Dense over 88 ids.
LSTM: the research benchmark's step, batch 4 x 80, Embedding(90, 8) -> 2 x LSTM 256 -> Dense 90.
Paths: torch's own kernels ("nn": what nn.GRU / nn.LSTM run), the pure-PyTorch fallback
("torch"), each compiled kernel variant this CPU runs (fp32), and bf16 where the CPU has
native bf16 dot products. Every path trains its own copy of the same model on the same batch
in one process, interleaved round-robin so that background load hits them alike; we report
the median. FLOPs per step = 3 x the forward's matmuls (recurrent, input projection through
the (V, G*H) lookup table for layer 0, output layer); the FLOP limit is that count at the rate
of a large fp32 matmul measured here (torch, 2048^3), the practically reachable peak.

--emulate-avx2 reruns this script as if on an AVX2-only CPU: torch's MKL, oneDNN and ATen
capped at AVX2 (MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY), and only the
kernel variants such a CPU runs. The caches and memory stay this machine's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from fedtext.errors import FedtextError
from fedtext.model import kernel
from fedtext.model.char_rnn import CharRNN, Compute, ModelConfig

AVX2_CAPS = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "ATEN_CPU_CAPABILITY": "avx2"}
EMULATED = "_FEDTEXT_BENCH_AVX2"  # set in the rerun
FLAGS_SHOWN = ("avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_bf16",
               "amx_bf16", "asimd", "bf16", "sve")


def cpu_flags() -> str:
    """The SIMD flags lscpu lists (the ones that matter here)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "?"
    for line in out.splitlines():
        if line.startswith("Flags:"):
            return " ".join(f for f in line.split()[1:] if f in FLAGS_SHOWN)
    return "?"


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The best rate of an n^3 fp32 torch matmul: the FLOP limit's rate."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def step_flops(cfg: ModelConfig, B: int, T: int) -> float:
    G = 3 if cfg.cell == "gru" else 4
    V, E, H, L = cfg.vocab_size, cfg.embed_dim, cfg.hidden_size, cfg.num_layers
    fwd = L * 2 * B * T * H * G * H  # recurrent
    fwd += 2 * V * E * G * H + (L - 1) * 2 * B * T * H * G * H  # input projections
    fwd += 2 * B * T * H * V  # output layer
    return 3 * fwd  # backward: about twice the forward


def paths() -> list[tuple[str, Compute]]:
    out = [("nn", Compute("nn")), ("torch fallback", Compute("torch"))]
    avx2_only = bool(os.environ.get(EMULATED))
    for v in kernel.runnable_variants():
        if avx2_only and v not in ("avx2", "scalar"):
            continue
        try:
            k = kernel.load(v)
        except kernel.KernelUnavailable:
            continue
        out.append((f"kernel {v}", Compute("kernel", "fp32", v)))
        if k.bf16:
            out.append((f"kernel {v} bf16", Compute("kernel", "bf16", v)))
    if kernel.bf16_native() and not avx2_only:
        out.append(("torch fallback bf16", Compute("torch", "bf16")))
    return out


def step_timer(cfg: ModelConfig, compute: Compute, x, y):
    torch.manual_seed(0)
    model = CharRNN(cfg, compute=compute)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> float:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y, mask=y != 0)
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    return step


def bench(title: str, cfg: ModelConfig, B: int, T: int, repeats: int, gflops: float,
          slow: set[str]) -> None:
    torch.manual_seed(0)
    x = torch.randint(1, cfg.vocab_size, (B, T))
    y = torch.randint(0, cfg.vocab_size, (B, T))  # id 0 = padding: masked out
    steps = {name: step_timer(cfg, c, x, y) for name, c in paths()}
    for step in steps.values():  # warm-up (and each kernel's one-time build)
        step()
    times = {name: [] for name in steps}
    for i in range(repeats):
        for name, step in steps.items():
            if name not in slow or i < max(1, repeats // 3):  # the scalar build is slow
                times[name].append(step())
    flops = step_flops(cfg, B, T)
    limit = flops / (gflops * 1e9)
    nn_med = statistics.median(times["nn"])
    print(f"\n### {title}\n")
    print(f"{flops / 1e9:.2f} GFLOP per step; FLOP limit {limit * 1e3:.1f} ms at "
          f"{gflops:.0f} GFLOP/s. Median of {repeats} interleaved steps "
          f"(fewer for {', '.join(sorted(slow)) or '-'}).\n")
    print("| path | s / step | speed-up vs nn | x FLOP limit | GFLOP/s |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.4f} | {nn_med / med:.2f}x | {med / limit:.1f} | "
              f"{flops / med / 1e9:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="timed steps per path (GRU)")
    ap.add_argument("--lstm-repeats", type=int, default=21, help="timed steps per path (LSTM)")
    ap.add_argument("--no-lstm", action="store_true", help="skip the LSTM section")
    ap.add_argument("--emulate-avx2", action="store_true", help="as on an AVX2-only CPU: torch "
                    "capped at AVX2, avx2 and scalar kernels only")
    args = ap.parse_args()
    if args.emulate_avx2 and not os.environ.get(EMULATED):
        argv = [a for a in sys.argv[1:] if a != "--emulate-avx2"]
        env = dict(os.environ, **AVX2_CAPS, **{EMULATED: "1"})
        raise SystemExit(subprocess.run([sys.executable, __file__, *argv], env=env).returncode)
    try:
        info = kernel.kernel_info()
    except FedtextError as e:
        raise SystemExit(f"bench_gru: {e}") from None
    gflops = matmul_gflops()
    print(f"# Recurrence paths, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"CPU: {info['cpu']} ({info['machine']}); lscpu flags: {cpu_flags()}")
    print(f"torch {info['torch']}, {info['threads']} threads; default kernel: {info['kernel']} "
          f"({info['kernel_threading']}); compiler: {info['compiler']}")
    if os.environ.get(EMULATED):
        print("Emulated AVX2-only CPU: " + ", ".join(f"{k}={v}" for k, v in AVX2_CAPS.items())
              + f" (torch reports {torch.backends.cpu.get_cpu_capability()}); kernels avx2, "
              "scalar")
    print(f"2048^3 fp32 torch matmul: {gflops:.0f} GFLOP/s")
    slow = {"kernel scalar"}
    bench("GRU: tutorial step, 8 x 100, Embedding 256 -> GRU 1024 -> Dense 88",
          ModelConfig(), 8, 100, args.repeats, gflops, slow)
    if not args.no_lstm:
        bench("LSTM: research benchmark step, 4 x 80, Embedding(90, 8) -> 2 x LSTM 256 -> "
              "Dense 90", ModelConfig(vocab_size=90, embed_dim=8, hidden_size=256, num_layers=2,
                                      cell="lstm"), 4, 80, args.lstm_repeats, gflops, set())


if __name__ == "__main__":
    main()
