"""Seconds per training step (forward, backward, SGD) of the tutorial's char-RNN, per GRU path.

    .venv/bin/python benchmarks/bench_gru.py            # tutorial model, batch 8 x 100
    .venv/bin/python benchmarks/bench_gru.py --hidden-size 256 --repeats 3

Every path trains the same model on the same batch in one process, interleaved round-robin so
that background load hits them alike; we report the median per path and ratios to nn.GRU (the
"nn" path is torch's own GRU kernel, what torch.nn.GRU runs) and to the FLOP limit:
  FLOPs per batch = 3 x (recurrent 2BT*H*3H + input 2BT*E*3H + output 2BT*H*V)  (19.3 G here)
  with the (V, 3H) lookup table the input part shrinks to 3 x 2V*E*3H            (15.9 G here)
The limit is those FLOPs at the CPU's fp32 FMA peak (--peak-gflops; 235 = 2 Zen 4 cores), and
we also measure a large torch matmul as the practically reachable rate.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_data import cpu_name  # sibling script: run as benchmarks/bench_gru.py

from fedtext import gru, gru_kernel
from fedtext.model.char_rnn import CharRNN, ModelConfig

PATHS = [("nn.GRU", "nn", "fp32"), ("torch fp32", "torch", "fp32"),
         ("torch bf16", "torch", "bf16"), ("kernel fp32", "kernel", "fp32")]


def step_timer(model, x, y, impl, precision):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> float:
        gru.set_impl(impl)
        gru.set_precision(precision)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=100)
    ap.add_argument("--embed-dim", type=int, default=256)
    ap.add_argument("--hidden-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=10, help="timed steps per path")
    ap.add_argument("--peak-gflops", type=float, default=235.0,
                    help="fp32 FMA peak of the CPU (235 = 2 Zen 4 cores with AVX-512)")
    args = ap.parse_args()

    B, T, E, H = args.batch_size, args.seq_len, args.embed_dim, args.hidden_size
    cfg = ModelConfig(embed_dim=E, hidden_size=H)
    V = cfg.vocab_size
    torch.manual_seed(0)
    x = torch.randint(0, 86, (B, T))
    y = torch.randint(0, 86, (B, T))
    paths = [p for p in PATHS if p[1] != "kernel" or gru_kernel.available()]
    steps = {}
    for name, impl, precision in paths:
        torch.manual_seed(0)
        steps[name] = step_timer(CharRNN(cfg), x, y, impl, precision)
        steps[name]()  # warm-up (and the kernel's one-time build)
        steps[name]()
    times = {name: [] for name, *_ in paths}
    for _ in range(args.repeats):
        for name, *_ in paths:
            times[name].append(steps[name]())

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    gemm_gflops = 5 * 2 * 2048**3 / (time.perf_counter() - t) / 1e9

    flops = 3 * (2 * B * T * H * 3 * H + 2 * B * T * E * 3 * H + 2 * B * T * H * V)
    flops_table = 3 * (2 * B * T * H * 3 * H + 2 * V * E * 3 * H + 2 * B * T * H * V)
    limit = flops_table / (args.peak_gflops * 1e9)
    base = statistics.median(times["nn.GRU"])

    print(f"# GRU training step: batch {B} x {T}, Embedding {E}, GRU {H}, V {V}; "
          f"{torch.get_num_threads()} threads; CPU: {cpu_name()}; torch {torch.__version__}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')}; median of {args.repeats} interleaved steps")
    print(f"# FLOPs per batch: {flops / 1e9:.1f} G ({flops_table / 1e9:.1f} G with the lookup "
          f"table); limit at {args.peak_gflops:.0f} GFLOP/s: {limit * 1e3:.0f} ms; "
          f"a 2048^3 torch matmul runs at {gemm_gflops:.0f} GFLOP/s")
    print("| path | s / batch | vs nn.GRU | vs FLOP limit |")
    print("|---|---|---|---|")
    for name, *_ in paths:
        med = statistics.median(times[name])
        print(f"| {name} | {med:.3f} | {base / med:.2f}x faster | {med / limit:.2f}x the limit |")
    if not gru_kernel.available():
        print(f"# kernel unavailable: {gru_kernel.unavailable_reason()}")


if __name__ == "__main__":
    main()
