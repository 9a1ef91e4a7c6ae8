"""Central evaluation: one pooled loss and accuracy over many batches (Keras' `model.evaluate`).

The numbers are the tutorial's. Loss is the mean cross-entropy in nats over counted targets;
accuracy is its FlattenedCategoricalAccuracy, argmax == target over counted targets; bits per
char is loss / ln 2. Padding is never counted. Everything is pooled over targets, so a client
with more text weighs more (per-client averages are fedtext.evaluation's business).

Each row of a batch starts from a zero recurrent state, as in the tutorial, so rows can be
regrouped freely: we restack the small (8, 100) client batches into large ones for speed, and
the result does not depend on how (up to float32 rounding in the per-chunk sums).

Example:
    model, _ = load_checkpoint(resolve_model_spec("pretrained"))
    r = evaluate_batches(model, random_text_batches(10, 8, 100, seed=0))
    r.accuracy  # ~ 1/86: the tutorial's sanity check on random text
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch

from fedtext.batching import Batch, client_batches
from fedtext.errors import FedtextError
from fedtext.model import CharRNN, token_stats

EVAL_ROWS = 256  # rows per forward pass: big matmuls, yet a (256, 100, 88) logits tensor is 9 MB


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy over counted targets, nats
    accuracy: float  # argmax == target over counted targets
    predictions: int  # counted targets

    @property
    def bits_per_char(self) -> float:
        return self.loss / math.log(2)

    def to_dict(self) -> dict:
        return {**asdict(self), "bits_per_char": self.bits_per_char}


def restack(batches: Iterable[Batch], rows: int = EVAL_ROWS) -> Iterator[Batch]:
    """Regroup batches into batches of `rows` rows (fewer at the end, or where seq_len changes).

    Rows with no counted target (the all-padding rows of a client's last batch) are dropped.
    """
    buf: list[Batch] = []

    def cat() -> Batch:
        return Batch(*(torch.cat(t) for t in zip(*buf)))

    for b in batches:
        keep = b.mask.any(dim=1)  # (B,)
        b = Batch(b.x[keep], b.y[keep], b.mask[keep])
        if buf and b.x.shape[1] != buf[0].x.shape[1]:
            big, buf = cat(), []
            if len(big.x):
                yield big
        buf.append(b)
        if sum(len(p.x) for p in buf) >= rows:
            big = cat()
            k = len(big.x) // rows * rows
            for i in range(0, k, rows):
                yield Batch(big.x[i:i + rows], big.y[i:i + rows], big.mask[i:i + rows])
            buf = [Batch(big.x[k:], big.y[k:], big.mask[k:])]
    if buf:
        big = cat()
        if len(big.x):
            yield big


@torch.no_grad()
def evaluate_batches(model: CharRNN, batches: Iterable[Batch], rows: int = EVAL_ROWS) -> EvalResult:
    """Pooled loss and accuracy of `model` over all counted targets of `batches`.

    Args:
      model: the CharRNN (switched to eval mode for the call and restored after).
      batches: Batch(x, y, mask) items; only mask=True targets count.
      rows: rows per forward pass (speed only; the result does not depend on it).
    Returns:
      EvalResult(loss, accuracy, predictions); loss and accuracy are NaN with no predictions.
    """
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0.0, 0  # python floats: float64 across chunks
    try:
        for x, y, mask in restack(batches, rows):
            logits, _ = model.run(x)  # (B, T, V), zero initial state per row
            l, c, n = token_stats(logits.float(), y, mask)
            loss_sum, correct, count = loss_sum + l.item(), correct + c.item(), count + int(n)
    finally:
        model.train(was_training)
    if count == 0:
        return EvalResult(math.nan, math.nan, 0)
    return EvalResult(loss_sum / count, correct / count, count)


def check_client_ids(store, client_ids: Sequence[str]) -> list[str]:
    """`client_ids` if all are in `store`, else a FedtextError naming the unknown ones."""
    known = set(store.client_ids)
    unknown = [c for c in client_ids if c not in known]
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise FedtextError(f"unknown client id(s): {shown} ({len(known)} clients in this split; "
                           f"`fedtext data clients` lists them)")
    return list(client_ids)


def store_batches(store, client_ids: Sequence[str] | None = None, *, batch_size: int = 8,
                  seq_len: int = 100, max_batches: int | None = None) -> Iterator[Batch]:
    """The tutorial's batches of each client, padded so that no client's text is dropped."""
    for cid in store.client_ids if client_ids is None else client_ids:
        yield from client_batches(store.chars(cid), batch_size=batch_size, seq_len=seq_len,
                                  mode="padded", max_batches=max_batches)


def evaluate_store(model: CharRNN, store, client_ids: Sequence[str] | None = None, *,
                   batch_size: int = 8, seq_len: int = 100, max_batches: int | None = None,
                   rows: int = EVAL_ROWS) -> EvalResult:
    """Pooled evaluation over clients of a ClientStore (all of them by default).

    Args:
      model: the CharRNN.
      store: a fedtext.data ClientStore (e.g. load_shakespeare().test).
      client_ids: which clients; unknown ids raise FedtextError.
      batch_size, seq_len: the tutorial's batching (8, 100): it decides where chunks start.
      max_batches: at most this many batches per client (the tutorial's `.take(n)`).
      rows: rows per forward pass (speed only).
    Returns:
      EvalResult pooled over every counted target.
    """
    if client_ids is not None:
        client_ids = check_client_ids(store, client_ids)
    batches = store_batches(store, client_ids, batch_size=batch_size, seq_len=seq_len,
                            max_batches=max_batches)
    return evaluate_batches(model, batches, rows)
