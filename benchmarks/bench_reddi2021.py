"""The Reddi et al. 2021 Shakespeare step and round on this CPU: what a 1200-round run costs.

    .venv/bin/python benchmarks/bench_reddi2021.py            # ~3 minutes on 2 cores

1. One training step (forward, masked cross-entropy, backward, SGD) of the task's model,
   Embedding(90, 8) -> 2 x LSTM 256 -> Dense(90), on a 4 x 80 batch: torch's nn.LSTM vs the C
   kernel, at 1 and 2 threads, interleaved, against the FLOP limit (the step's FLOPs at the
   rate of a 2048^3 fp32 matmul with the same threads).
2. Side by side: two processes, one thread each, stepping at the same time, vs one process
   with two threads: total steps per second of the machine.
3. One full evaluation of the test split (every test client, the benchmark's protocol) at 1
   and 2 threads.
Prints markdown tables (BENCHMARKS.md) and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

MODEL = dict(vocab_size=90, embed_dim=8, hidden_size=256, num_layers=2, cell="lstm")


def step_flops(B=4, T=80, V=90, E=8, H=256, L=2) -> float:
    fwd = L * 2 * B * T * H * 4 * H  # recurrent matmuls
    fwd += 2 * V * E * 4 * H + (L - 1) * 2 * B * T * H * 4 * H  # input projections
    fwd += 2 * B * T * H * V  # output layer
    return 3 * fwd  # backward: about twice the forward


def matmul_gflops(n=2048, repeats=5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def stepper(impl: str):
    from fedtext.model.char_rnn import CharRNN, Compute, ModelConfig

    torch.manual_seed(0)
    model = CharRNN(ModelConfig(**MODEL), compute=Compute(impl))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x = torch.randint(1, 90, (4, 80))
    y = torch.randint(0, 90, (4, 80))

    def step():
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y, mask=y != 0)
        loss.backward()
        opt.step()

    return step


def steps_table(repeats: int) -> list[str]:
    flops = step_flops()
    lines = ["| threads | path | s / step (median) | vs nn.LSTM | FLOP limit | x limit |",
             "|---|---|---|---|---|---|"]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        limit = flops / (matmul_gflops() * 1e9)
        steps = {impl: stepper(impl) for impl in ("nn", "kernel")}
        for s in steps.values():
            for _ in range(5):
                s()
        times = {impl: [] for impl in steps}
        for _ in range(repeats):
            for impl, s in steps.items():
                times[impl].append(_timed(s))
        med = {k: statistics.median(v) for k, v in times.items()}
        for impl, name in (("nn", "nn.LSTM"), ("kernel", "C kernel")):
            lines.append(f"| {threads} | {name} | {med[impl]:.4f} | "
                         f"{med['nn'] / med[impl]:.2f}x | {limit:.4f} | "
                         f"{med[impl] / limit:.2f} |")
    return lines


def worker(threads: int, seconds: float) -> None:
    """Step the kernel path for `seconds`; print the steps done."""
    torch.set_num_threads(threads)
    step = stepper("kernel")
    for _ in range(5):
        step()
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        step()
        n += 1
    print(n, flush=True)


def side_by_side(seconds: float) -> list[str]:
    def launch(threads):
        return subprocess.Popen([sys.executable, __file__, "--worker", str(threads),
                                 "--seconds", str(seconds)], stdout=subprocess.PIPE, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS=str(threads)))

    lines = ["| layout | steps in the window | machine steps / s | s / step (machine) |",
             "|---|---|---|---|"]
    one = launch(2)
    n1 = int(one.communicate()[0].split()[-1])
    pair = [launch(1), launch(1)]
    n2 = [int(p.communicate()[0].split()[-1]) for p in pair]
    for name, n in (("one process, 2 threads", n1),
                    (f"two processes, 1 thread each ({n2[0]} + {n2[1]})", sum(n2))):
        lines.append(f"| {name} | {n} | {n / seconds:.1f} | {seconds / n:.4f} |")
    return lines


def eval_table() -> list[str]:
    from fedtext.data.tasks import TASKS, DataConfig, open_dataset
    from fedtext.model.spec import ModelSpec, load_initial_model
    from fedtext.run.evaluation import build_eval_set, eval_sample, evaluate

    task = TASKS["reddi2021"]
    model = load_initial_model(ModelSpec(init="scratch"), task.vocab, task.model_defaults, 0)
    ds = open_dataset("shakespeare")
    cfg = DataConfig(task="reddi2021", batch_size=4, seq_len=80, shuffle_buffer=50)
    es = build_eval_set(ds.test, eval_sample(ds.test, None, 0), task, cfg)
    lines = [f"Full test split: {len(es.client_ids)} clients, {len(es.x):,} rows of 80, "
             f"{es.chars:,} targets.", "", "| threads | s / evaluation |", "|---|---|"]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        lines.append(f"| {threads} | {_timed(lambda: evaluate(model, es)):.1f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=40, help="timed steps per path")
    ap.add_argument("--seconds", type=float, default=20.0, help="side-by-side window")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--no-eval", action="store_true", help="skip the evaluation timing")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.seconds)
        return
    from fedtext.model.kernel import kernel_info

    info = kernel_info()
    print(f"# reddi2021 step, {time.strftime('%Y-%m-%d %H:%M %Z')}; CPU {info['cpu']}, "
          f"{os.cpu_count()} cores, torch {info['torch']}, kernel {info['kernel']}; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    print(f"\n{step_flops() / 1e9:.2f} GFLOP per step (4 x 80).\n")
    print("\n".join(steps_table(args.repeats)))
    print()
    print("\n".join(side_by_side(args.seconds)))
    if not args.no_eval:
        print()
        print("\n".join(eval_table()))
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
