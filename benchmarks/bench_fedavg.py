"""How much a federated round costs over its client training: wall(round) / wall(plain loop).

    .venv/bin/python benchmarks/bench_fedavg.py                      # the tutorial's GRU 1024
    .venv/bin/python benchmarks/bench_fedavg.py --hidden-size 64     # a quick check

For each workload (K clients x B batches of 8 x 100, K in --clients), in one process:

  plain   one CharRNN and one SGD(lr 0.5) train the K * B batches in a plain Python loop
          (forward, masked loss, backward, step): the cost of the arithmetic alone;
  nn      the same plain loop with torch's own nn.GRU kernel (`impl = "nn"`): what a
          user's hand-written PyTorch loop costs;
  round   one round of `fedtext train`'s loop on the same batches: run.experiment.run_rounds
          with fl.algorithm.fed_avg (broadcast, client_update per client with its batches
          built from the client's char ids in a packed store, aggregation, server step), the
          metrics row (metrics.jsonl + TensorBoard) and the atomic state checkpoint.
          Evaluation is off (it is not part of a round's training cost).

The three alternate --reps times after a warm-up of each, and the medians are compared. The
target is ratio <= 1.05. Run it on a quiet machine: other processes on the same cores make
both numbers noisy (and more than one torch thread per free core makes them slow).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedtext.data.batching import client_batches
from fedtext.data.store import ClientStore
from fedtext.data.tasks import TASKS, DataConfig
from fedtext.data.vocab import TUTORIAL
from fedtext.fl import aggregators, server_optimizers
from fedtext.fl.algorithm import fed_avg
from fedtext.fl.client import ClientConfig
from fedtext.fl.sampling import FixedSampler
from fedtext.model.char_rnn import CharRNN, Compute, ModelConfig, token_stats
from fedtext.run.experiment import run_rounds
from fedtext.run.recorder import RunRecorder


def client_store(k: int, batches: int, batch_size: int, seq_len: int, seed: int = 0):
    """k clients with exactly `batches` full batches of random text each, packed as a store."""
    rng = np.random.default_rng(seed)
    n = batches * batch_size * (seq_len + 1)
    return ClientStore.from_texts({f"client_{i}": [TUTORIAL.decode(rng.integers(
        0, len(TUTORIAL.chars), n))] for i in range(k)})


def plain_loop(model: CharRNN, all_batches: list, lr: float) -> float:
    """Seconds to train the batches one after the other: the arithmetic alone."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    t0 = time.perf_counter()
    for b in all_batches:
        logits, _ = model(b.x)  # (B, T, V)
        loss_sum, _, count = token_stats(logits, b.y, b.mask)
        loss = loss_sum / count
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def store_batches(store, cid, epoch, seed, *, cfg, max_batches):
    """The tutorial task's batches of one client (what ClientData does, on an in-memory store)."""
    del epoch, seed  # no shuffling: the plain loop trains the same batches in the same order
    return TASKS["tutorial"].batches(store, cid, cfg, None, max_batches)


def bench(k: int, args, model_config: ModelConfig, out: Path) -> dict:
    data_cfg = DataConfig(batch_size=args.batch_size, seq_len=args.seq_len, shuffle=False)
    store = client_store(k, args.batches, args.batch_size, args.seq_len)
    all_batches = [b for cid in store.client_ids
                   for b in client_batches(store.chars(cid), batch_size=args.batch_size,
                                           seq_len=args.seq_len)]
    torch.manual_seed(0)
    model = CharRNN(model_config)
    client = ClientConfig(lr=0.5, max_batches=args.batches, model=model_config)
    algorithm = fed_avg(client, server_optimizers.build(server_optimizers.ServerConfig(), 1),
                        aggregators.mean(), "tokens")
    sampler = FixedSampler(list(store.client_ids))
    state = algorithm.init({n: p.detach().clone() for n, p in model.named_parameters()})
    out.mkdir(parents=True, exist_ok=True)
    recorder = RunRecorder(out, lambda: {"config": {}}, tensorboard=True)

    def client_data(cid):
        return functools.partial(store_batches, store, cid, cfg=data_cfg,
                                 max_batches=args.batches)

    def one_round():
        nonlocal state
        t0 = time.perf_counter()
        state = run_rounds(algorithm, state, sampler, client_data, state.round + 1,
                           on_round=recorder, progress=False, log=lambda s: None)
        return time.perf_counter() - t0

    nn_model = CharRNN(model_config, compute=Compute(impl="nn"))
    nn_model.load_state_dict(model.state_dict())
    plain_loop(model, all_batches[:2], 0.5)  # warm-up: allocator, GRU kernel, autograd
    plain_loop(nn_model, all_batches[:2], 0.5)
    one_round()
    plain, nn_plain, rounds = [], [], []
    for _ in range(args.reps):
        plain.append(plain_loop(model, all_batches, 0.5))
        nn_plain.append(plain_loop(nn_model, all_batches, 0.5))
        rounds.append(one_round())
    recorder.close()
    p, q, r = statistics.median(plain), statistics.median(nn_plain), statistics.median(rounds)
    return {"clients": k, "steps": len(all_batches), "plain_s": p, "nn_s": q, "round_s": r,
            "ratio": r / p, "vs_nn": q / r,
            "chars_per_s": len(all_batches) * args.batch_size * args.seq_len / r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden-size", type=int, default=1024, help="GRU units (default 1024, "
                    "the tutorial's)")
    ap.add_argument("--embed-dim", type=int, default=256, help="embedding size (default 256)")
    ap.add_argument("--clients", default="3,10,30", help="clients per round, comma-separated "
                    "(default 3,10,30)")
    ap.add_argument("--batches", type=int, default=5, help="batches per client (default 5)")
    ap.add_argument("--batch-size", type=int, default=8, help="default 8")
    ap.add_argument("--seq-len", type=int, default=100, help="default 100")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (default 3)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    mc = ModelConfig(embed_dim=args.embed_dim, hidden_size=args.hidden_size)
    print(f"GRU {mc.hidden_size}, embedding {mc.embed_dim}, {CharRNN(mc).num_params():,} "
          f"params; {args.batches} batches of {args.batch_size}x{args.seq_len} per client; "
          f"{torch.get_num_threads()} torch threads; median of {args.reps}")
    print(f"{'clients':>7s} {'steps':>5s} {'plain s':>8s} {'round s':>8s} {'ratio':>6s} "
          f"{'chars/s':>8s} {'nn.GRU s':>9s} {'round vs nn.GRU':>16s}")
    with tempfile.TemporaryDirectory(prefix="bench_fedavg.") as tmp:
        for i, k in enumerate(int(c) for c in args.clients.split(",")):
            r = bench(k, args, mc, Path(tmp) / str(i))
            print(f"{r['clients']:7d} {r['steps']:5d} {r['plain_s']:8.3f} {r['round_s']:8.3f} "
                  f"{r['ratio']:6.3f} {r['chars_per_s']:8,.0f} {r['nn_s']:9.3f} "
                  f"{r['vs_nn']:15.2f}x", flush=True)


if __name__ == "__main__":
    main()
