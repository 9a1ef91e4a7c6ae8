"""The one evaluation: per-client sums of loss, correct predictions and counted targets.

Everything held out is scored the same way, whoever asks (the training loop every round,
`fedtext evaluate`, pre-training's validation, the tutorial's checks, a Flower node):

    es = build_eval_set(store, client_ids, task, data_cfg)   # once: the clients' padded rows
    row = evaluate(model, es)                                # every eval: a few big passes
    result = evaluate_batches(model, batches)                # pooled, for any batches
    sums = evaluate_client(params, client_data, config, seed)  # one client, anywhere

The numbers are the tutorial's. Loss is the mean cross-entropy in nats over counted targets;
accuracy is its FlattenedCategoricalAccuracy, argmax == target over counted targets (padding
never counts). Each row starts from a zero recurrent state, as in the tutorial, so rows can be
regrouped freely: `build_eval_set` restacks the small (8, 100) client batches into one array
with a client index per row, and scoring runs EVAL_ROWS rows per forward pass. The result
does not depend on how (up to float32 rounding in the per-chunk sums).

`summarize` turns per-client sums into a metrics row:

    eval_loss, eval_accuracy      pooled over counted targets (every character weighs the same,
                                  as Keras' evaluate: the "weighted" mean over clients)
    eval_unweighted_loss/accuracy the plain mean over clients (every client weighs the same)
    eval_accuracy_p10/p50/p90     percentiles of the per-client accuracy
    eval_chars, eval_clients      what was scored
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fedtext.data.batching import Batch
from fedtext.errors import FedtextError
from fedtext.model.char_rnn import CharRNN

EVAL_ROWS = 256  # rows per forward pass: big matmuls, and (256, 100, 88) logits are 9 MB
_EVAL_SAMPLE_TAG = 2  # SeedSequence word: the eval sample never shares the sampler's stream


@dataclass(frozen=True)
class EvalConfig:
    """[eval]: held-out evaluation during training."""

    every: int = field(default=1, metadata={
        "flag": "eval-every", "metavar": "N", "help": "evaluate on held-out test clients "
        "every N rounds, before the first and after the last; 0 = no evaluation"})
    clients: int | None = field(default=None, metadata={
        "flag": "eval-clients", "metavar": "N", "help": "a fixed seeded sample of N test "
        "clients; 0 = all of them"})
    client_ids: tuple[str, ...] = field(default=(), metadata={
        "flag": "eval-client-ids", "metavar": "ID,...", "help": "comma-separated test client "
        "ids to evaluate on instead"})
    final_rounds: int = field(default=0, metadata={
        "flag": "eval-final-rounds", "metavar": "N", "help": "also evaluate every "
        "--eval-final-every rounds within the run's last N rounds (Reddi et al. report the "
        "mean over the last 100); 0 = off"})
    final_every: int = field(default=1, metadata={
        "flag": "eval-final-every", "metavar": "K", "help": "within the last --eval-final-rounds"
        " rounds, evaluate after every K-th round, counted back from the last"})

    def __post_init__(self):
        if self.every < 0:
            raise FedtextError(f"every must be >= 0 (0 = off), not {self.every}")
        if self.final_rounds < 0:
            raise FedtextError(f"final_rounds must be >= 0 (0 = off), not {self.final_rounds}")
        if self.final_every < 1:
            raise FedtextError(f"final_every must be >= 1, not {self.final_every}")
        if self.clients is not None and self.clients < 1:
            raise FedtextError(f"clients must be >= 1 (or all), not {self.clients}")
        if self.clients and self.client_ids:
            raise FedtextError("give clients (a sample size) or client_ids, not both")
        if len(set(self.client_ids)) != len(self.client_ids):
            raise FedtextError("client_ids lists a client twice")

    def due(self, round: int, last: int) -> bool:
        """Whether to evaluate after `round` (0 = before training) of a run ending at `last`.

        >>> cfg = EvalConfig(every=100, final_rounds=100, final_every=10)
        >>> [r for r in range(1201) if cfg.due(r, 1200)][-12:]
        [1000, 1100, 1110, 1120, 1130, 1140, 1150, 1160, 1170, 1180, 1190, 1200]
        """
        if self.every <= 0:
            return False
        final = last - self.final_rounds < round <= last and \
            (last - round) % self.final_every == 0
        return round % self.every == 0 or round == last or final


@dataclass(frozen=True)
class EvalSet:
    """Held-out rows of some clients, built once, scored every eval round in one pass."""

    x: torch.Tensor  # (N, T) int64 inputs; every row has at least one counted target
    y: torch.Tensor  # (N, T) int64 targets
    mask: torch.Tensor  # (N, T) bool, True where the target counts
    client: torch.Tensor  # (N,) int64: the row's position in client_ids
    client_ids: tuple[str, ...]

    @property
    def chars(self) -> int:
        return int(self.mask.sum())

    @classmethod
    def from_batches(cls, batches_per_client: Iterable[Iterable[Batch]],
                     client_ids: Sequence[str]) -> EvalSet:
        """Restack each client's batches (rows without a counted target are dropped)."""
        xs, ys, ms, cs = [], [], [], []
        for i, batches in enumerate(batches_per_client):
            for b in batches:
                keep = b.mask.any(dim=1)  # the all-padding rows that fill a last batch
                xs.append(b.x[keep]), ys.append(b.y[keep]), ms.append(b.mask[keep])
                cs.append(torch.full((int(keep.sum()),), i, dtype=torch.int64))
        if not xs or not sum(len(x) for x in xs):
            raise FedtextError("the evaluation data holds no text to score")
        seq = {x.shape[1] for x in xs}
        if len(seq) > 1:
            raise FedtextError(f"evaluation batches of different lengths {sorted(seq)}")
        return cls(torch.cat(xs), torch.cat(ys), torch.cat(ms), torch.cat(cs), tuple(client_ids))


def build_eval_set(store, client_ids: Sequence[str], task, data_cfg) -> EvalSet:
    """The clients' text, padded (nothing dropped, whatever training does), restacked."""
    for cid in client_ids:
        store.index(cid)  # an unknown id: one error line with suggestions
    return EvalSet.from_batches(
        (task.batches(store, cid, data_cfg, padded=True) for cid in client_ids), client_ids)


def eval_sample(store, n: int | None, seed: int) -> list[str]:
    """A fixed, seeded sample of n clients that have a target (all of them for n = None)."""
    sizes = np.asarray(store.chars_per_client)
    ok = np.flatnonzero(sizes >= 2)  # one char is an input with no target
    if n and n < len(ok):
        rng = np.random.default_rng(np.random.SeedSequence([seed, _EVAL_SAMPLE_TAG]))
        ok = np.sort(rng.choice(ok, size=n, replace=False))  # store order, for reading
    return [store.client_ids[i] for i in ok]


@torch.no_grad()
def client_sums(model: CharRNN, es: EvalSet, rows: int = EVAL_ROWS,
                progress: bool = False) -> torch.Tensor:
    """(3, clients) float64: loss_sum, correct, count of `model` on each client of `es`."""
    sums = torch.zeros(3, len(es.client_ids), dtype=torch.float64)
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for i in tqdm(range(0, len(es.x), rows), desc="eval", unit="chunk", leave=False,
                      disable=not progress, dynamic_ncols=True):
            x, y, m = (t[i:i + rows].to(dev) for t in (es.x, es.y, es.mask))
            logits, _ = model.run(x)  # (b, T, V), every row from a zero state
            V = logits.size(-1)
            nll = F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1),
                                  reduction="none").view_as(m)  # (b, T)
            per_row = torch.stack([(nll * m).sum(1), ((logits.argmax(-1) == y) & m).sum(1),
                                   m.sum(1)]).double().cpu()  # (3, b)
            sums.index_add_(1, es.client[i:i + rows], per_row)
    finally:
        model.train(was_training)
    return sums


def summarize(sums: torch.Tensor, prefix: str = "eval_") -> dict:
    """(3, clients) per-client sums -> pooled, unweighted and percentile metrics."""
    loss_sum, correct, count = sums.sum(1).tolist()
    scored = sums[2] > 0
    nan = float("nan")
    if not scored.any():
        c_loss = c_acc = np.array([nan])
    else:
        c_loss = (sums[0] / sums[2])[scored].numpy()
        c_acc = (sums[1] / sums[2])[scored].numpy()
    p10, p50, p90 = np.percentile(c_acc, [10, 50, 90]).tolist()
    return {f"{prefix}loss": loss_sum / count if count else nan,
            f"{prefix}accuracy": correct / count if count else nan,
            f"{prefix}chars": int(count), f"{prefix}clients": int(sums.shape[1]),
            f"{prefix}unweighted_loss": float(c_loss.mean()),
            f"{prefix}unweighted_accuracy": float(c_acc.mean()),
            f"{prefix}accuracy_p10": p10, f"{prefix}accuracy_p50": p50,
            f"{prefix}accuracy_p90": p90}


def evaluate(model: CharRNN, es: EvalSet, rows: int = EVAL_ROWS, progress: bool = False,
             prefix: str = "eval_") -> dict:
    """The metrics row of `model` on `es` (see the module docstring)."""
    return summarize(client_sums(model, es, rows, progress), prefix)


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy over counted targets, nats
    accuracy: float  # argmax == target over counted targets
    predictions: int  # counted targets

    @property
    def bits_per_char(self) -> float:
        return self.loss / math.log(2)

    def to_dict(self) -> dict:
        return {"loss": self.loss, "accuracy": self.accuracy, "predictions": self.predictions,
                "bits_per_char": self.bits_per_char}


def evaluate_batches(model: CharRNN, batches: Iterable[Batch], rows: int = EVAL_ROWS,
                     progress: bool = False) -> EvalResult:
    """Pooled loss and accuracy of `model` over all counted targets of `batches`."""
    batches = list(batches)
    if not batches or not any(bool(b.mask.any()) for b in batches):
        return EvalResult(math.nan, math.nan, 0)
    row = evaluate(model, EvalSet.from_batches([batches], ["all"]), rows, progress)
    return EvalResult(row["eval_loss"], row["eval_accuracy"], row["eval_chars"])


def evaluate_client(global_params, client_data, config, seed: int) -> dict:
    """The global model's sums on one client's data (loss_sum, correct, count): client_update's
    signature, so any backend (or a Flower node, on its own data) can run it."""
    from fedtext.fl.client import cached_model, load_params

    model = cached_model(config.model, config.compute, config.dtype, config.device)
    load_params(model, global_params)
    batches = list(client_data(0, seed) if callable(client_data) else client_data)
    if not batches:
        return {"loss_sum": 0.0, "correct": 0, "count": 0}
    sums = client_sums(model, EvalSet.from_batches([batches], ["client"]))[:, 0].tolist()
    return {"loss_sum": sums[0], "correct": int(sums[1]), "count": int(sums[2])}
