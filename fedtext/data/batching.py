"""Client text -> training batches (the tutorial's preprocessing, and a padded + masked variant).

The tutorial's pipeline for one client (TFF "Federated Learning for Text Generation")::

    snippets -> char ids -> one stream -> .batch(SEQ_LENGTH + 1, drop_remainder=True)
             -> .shuffle(BUFFER_SIZE) -> .batch(BATCH_SIZE, drop_remainder=True)
             -> (x = seq[:-1], y = seq[1:])

`client_batches(ids, mode="drop_remainder")` is exactly that, so a client needs at least
(SEQ_LENGTH + 1) * BATCH_SIZE = 808 characters for one batch and most Shakespeare clients
yield none. `mode="padded"` (the default) keeps every client with 2 or more characters: the
last, short sequence is padded with `pad_id`, the last batch is filled with all-padding rows,
and `mask` is False wherever the target is padding, so loss and accuracy count real targets
only. The ids are whatever the caller's vocabulary uses (fedtext.data.tasks maps the store's
ids to a task's vocabulary before batching).

The Reddi et al. 2021 task (TFF's `tff.simulation.baselines.shakespeare`, its
`char_prediction_preprocessing.create_preprocess_fn`) works per snippet instead::

    snippets -> .shuffle(50) -> [BOS] + char ids + [EOS], padded with PAD to a multiple of
             SEQ + 1 -> .unbatch().batch(SEQ + 1) -> .batch(4)  (the last batch kept short)
             -> (x = seq[:-1], y = seq[1:])

which is `snippet_batches`: the shuffle is over snippets (a snippet's sequences stay together
and in order), every sequence belongs to one snippet, PAD only ever follows EOS, and the mask is
`y != PAD` (TFF's MaskedCategoricalAccuracy(masked_tokens=[pad])): EOS and OOV targets count.

Everything is vectorised numpy; the only Python loop is the shuffle buffer, one step per
sequence (or snippet), not per character.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from fedtext.data.vocab import PAD_ID, TUTORIAL, Vocab
from fedtext.errors import FedtextError

MODES = ("padded", "drop_remainder")


class Batch(NamedTuple):
    x: torch.Tensor  # (B, T) int64 input ids
    y: torch.Tensor  # (B, T) int64 target ids (the pad id where padded)
    mask: torch.Tensor  # (B, T) bool: True where the target is counted in loss and accuracy


def shuffle_order(n: int, buffer_size: int, seed: int | None) -> np.ndarray:
    """The order in which TF's `Dataset.shuffle(buffer_size, seed)` emits n elements.

    Semantics of TF's ShuffleDataset (not its random stream): fill a buffer with the first
    `buffer_size` elements; then repeatedly emit a uniformly chosen buffer slot and refill that
    slot with the next input element (or, once the input is used up, with the buffer's last
    element). seed=None means no shuffling at all, as in the TFF reference data.
    """
    if seed is None or n <= 1 or buffer_size <= 1:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    u = rng.random(n)  # one draw per emitted element
    buf = list(range(min(buffer_size, n)))
    nxt, out = len(buf), np.empty(n, dtype=np.int64)
    for t in range(n):
        i = int(u[t] * len(buf))
        out[t] = buf[i]
        if nxt < n:
            buf[i], nxt = nxt, nxt + 1
        else:
            buf[i] = buf[-1]
            buf.pop()
    return out


def _sequences(ids: np.ndarray, seq_len: int, padded: bool,
               pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """ids (N,) -> (seqs (S, T+1) uint8, valid (S, T+1) bool), non-overlapping chunks."""
    L = seq_len + 1
    n_full, rem = divmod(len(ids), L)
    seqs = ids[: n_full * L].reshape(n_full, L)
    valid = np.ones((n_full, L), dtype=bool)
    if padded and rem >= 2:  # a trailing chunk of 1 char has no target: dropped
        last = np.full((1, L), pad_id, dtype=ids.dtype)
        last[0, :rem] = ids[n_full * L :]
        seqs = np.concatenate([seqs, last])
        valid = np.concatenate([valid, np.arange(L)[None] < rem])
    return seqs, valid


def client_batches(
    ids: np.ndarray,
    *,
    batch_size: int = 8,
    seq_len: int = 100,
    mode: str = "padded",
    shuffle_seed: int | None = None,
    buffer_size: int = 100,
    max_batches: int | None = None,
    pad_id: int = PAD_ID,
) -> list[Batch]:
    """One client's char ids -> batches of (x, y, mask), each tensor (batch_size, seq_len).

    Args:
      ids: (N,) char ids of the client's snippets concatenated (ClientStore.chars).
      mode: "padded" (keep every char that has a target) or "drop_remainder" (the tutorial).
      shuffle_seed: seed of the buffered shuffle of sequences; None keeps stream order.
      buffer_size: the shuffle buffer (the tutorial's BUFFER_SIZE = 100).
      max_batches: keep only the first this many batches (after shuffling).
      pad_id: what fills padded inputs and targets (masked out either way).

    Returns:
      A list of Batch; empty when the client is too small for the mode.

    >>> [tuple(b.x.shape) for b in client_batches(np.zeros(808, np.uint8), mode="drop_remainder")]
    [(8, 100)]
    >>> int(client_batches(np.zeros(50, np.uint8))[0].mask.sum())
    49
    """
    if mode not in MODES:
        raise FedtextError(f"unknown batching mode {mode!r}; expected one of {', '.join(MODES)}")
    if batch_size < 1 or seq_len < 1:
        raise FedtextError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    padded = mode == "padded"
    seqs, valid = _sequences(np.asarray(ids), seq_len, padded, pad_id)
    order = shuffle_order(len(seqs), buffer_size, shuffle_seed)
    seqs, valid = seqs[order], valid[order]
    n_batches = -(-len(seqs) // batch_size) if padded else len(seqs) // batch_size
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    if n_batches == 0:
        return []
    rows = n_batches * batch_size
    if rows > len(seqs):  # fill the last batch with all-PAD rows
        fill = rows - len(seqs)
        seqs = np.concatenate([seqs, np.full((fill, seq_len + 1), pad_id, seqs.dtype)])
        valid = np.concatenate([valid, np.zeros((fill, seq_len + 1), dtype=bool)])
    seqs = torch.from_numpy(seqs[:rows].astype(np.int64)).view(n_batches, batch_size, -1)
    mask = torch.from_numpy(valid[:rows, 1:].copy()).view(n_batches, batch_size, -1)
    x, y = seqs[..., :-1], seqs[..., 1:]  # (NB, B, T) each
    return [Batch(x[i], y[i], mask[i]) for i in range(n_batches)]


def snippet_batches(
    ids: np.ndarray,
    lengths: np.ndarray,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    batch_size: int = 4,
    seq_len: int = 80,
    shuffle_seed: int | None = None,
    buffer_size: int = 50,
    max_batches: int | None = None,
    drop_remainder: bool = False,
) -> list[Batch]:
    """One client's snippets -> TFF's per-snippet batches (Reddi et al. 2021; module docstring).

    Args:
      ids: (N,) char ids of the client's snippets concatenated, in the task's vocabulary
        (never pad_id, bos_id or eos_id).
      lengths: (S,) characters per snippet (ClientStore.snippet_lengths); ids is their concat.
      bos_id, eos_id, pad_id: the vocabulary's special ids.
      shuffle_seed: seed of the buffered shuffle of *snippets*; None keeps their order (TFF's
        evaluation: shuffle_buffer_size=1).
      buffer_size: the shuffle buffer, in snippets (TFF's DEFAULT_SHUFFLE_BUFFER_SIZE = 50).
      max_batches: keep only the first this many batches (after shuffling).
      drop_remainder: drop a last batch of fewer than batch_size rows (TFF keeps it).

    Returns:
      Batches of (batch_size, seq_len). The last one, if short, is filled with all-PAD rows
      whose mask is False everywhere, so it counts exactly what TFF's short batch counts.

    >>> b, = snippet_batches(np.array([5, 6, 7], np.uint8), np.array([3]), bos_id=88,
    ...                      eos_id=89, pad_id=0, batch_size=1, seq_len=5)
    >>> b.x.tolist(), b.y.tolist(), b.mask.tolist()
    ([[88, 5, 6, 7, 89]], [[5, 6, 7, 89, 0]], [[True, True, True, True, False]])
    """
    if batch_size < 1 or seq_len < 1:
        raise FedtextError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    ids, lengths = np.asarray(ids), np.asarray(lengths, dtype=np.int64)
    if int(lengths.sum()) != len(ids):
        raise FedtextError(f"snippet lengths sum to {int(lengths.sum())}, not the {len(ids)} ids")
    L = seq_len + 1
    order = shuffle_order(len(lengths), buffer_size, shuffle_seed)
    lens = lengths[order]  # (S,) in emitted order
    src = np.concatenate([[0], np.cumsum(lengths)])[order]  # where each snippet's chars start
    width = -(-(lens + 2) // L) * L  # [BOS] + chars + [EOS], rounded up to a multiple of L
    start = np.concatenate([[0], np.cumsum(width)[:-1]])  # (S,) where each snippet goes
    tokens = np.full(int(width.sum()), pad_id, dtype=np.int64)
    tokens[start] = bos_id
    tokens[start + 1 + lens] = eos_id
    within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    tokens[np.repeat(start + 1, lens) + within] = ids[np.repeat(src, lens) + within]
    seqs = tokens.reshape(-1, L)  # (R, L): every row is one snippet's chunk
    n_rows = len(seqs) - (len(seqs) % batch_size if drop_remainder else 0)
    n_batches = -(-n_rows // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    if n_batches == 0:
        return []
    rows = n_batches * batch_size
    seqs = seqs[:rows]
    if rows > len(seqs):  # the short last batch: all-PAD rows, masked everywhere
        seqs = np.concatenate([seqs, np.full((rows - len(seqs), L), pad_id, np.int64)])
    seqs = torch.from_numpy(seqs).view(n_batches, batch_size, L)
    x, y = seqs[..., :-1], seqs[..., 1:]  # (NB, B, T) each
    mask = y != pad_id  # only PAD is masked: EOS and OOV targets count
    return [Batch(x[i], y[i], mask[i]) for i in range(n_batches)]


def kept_counts(num_chars: np.ndarray, batch_size: int = 8, seq_len: int = 100) -> dict:
    """What each mode keeps of clients with these sizes (chars): clients, targets, batches.

    Counted targets are the chars trained on (mask True). Vectorised over clients.
    """
    n = np.asarray(num_chars, dtype=np.int64)
    L = seq_len + 1
    full, rem = np.divmod(n, L)
    drop_batches = full // batch_size
    pad_seqs = full + (rem >= 2)
    pad_targets = full * seq_len + np.maximum(rem - 1, 0)
    return {
        "clients_kept_drop_remainder": int((drop_batches > 0).sum()),
        "clients_kept_padded": int((pad_targets > 0).sum()),
        "targets_drop_remainder": int((drop_batches * batch_size * seq_len).sum()),
        "targets_padded": int(pad_targets.sum()),
        "batches_drop_remainder": int(drop_batches.sum()),
        "batches_padded": int((-(-pad_seqs // batch_size)).sum()),
    }


def random_text_batches(
    num_batches: int, batch_size: int = 8, seq_len: int = 100, seed: int = 0,
    vocab: Vocab = TUTORIAL,
) -> list[Batch]:
    """The tutorial's sanity check: uniformly random characters of the vocabulary.

    A model should score about 1/86 = 0.012 accuracy here, far below its Shakespeare score.
    """
    rng = np.random.default_rng(seed)
    lo = vocab.first_id
    seqs = rng.integers(lo, lo + len(vocab.chars), size=(num_batches, batch_size, seq_len + 1))
    seqs = torch.from_numpy(seqs.astype(np.int64))
    mask = torch.ones(batch_size, seq_len, dtype=torch.bool)
    return [Batch(s[:, :-1], s[:, 1:], mask) for s in seqs]
