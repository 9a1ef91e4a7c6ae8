"""Batching: the tutorial's drop-remainder pipeline, the padded + masked one, the shuffle."""

import numpy as np
import pytest
import torch

from fedtext.data import vocab
from fedtext.data.batching import (
    Batch,
    client_batches,
    kept_counts,
    random_text_batches,
    shuffle_order,
)
from fedtext.data.vocab import OOV_ID, PAD_ID
from fedtext.errors import FedtextError


def ids(n, seed=0):
    return np.random.default_rng(seed).integers(0, 86, n).astype(np.uint8)


def targets(batches):
    return sum(int(b.mask.sum()) for b in batches)


@pytest.mark.parametrize("n, expected", [(0, 0), (807, 0), (808, 1), (1615, 1), (1616, 2)])
def test_drop_remainder_needs_808_chars_per_batch(n, expected):
    batches = client_batches(ids(n), mode="drop_remainder")
    assert len(batches) == expected
    for b in batches:
        assert isinstance(b, Batch)
        assert b.x.shape == b.y.shape == b.mask.shape == (8, 100)
        assert b.x.dtype == b.y.dtype == torch.int64 and b.mask.dtype == torch.bool
        assert b.mask.all()


def test_drop_remainder_is_the_tutorial_stream():
    a = ids(1200)  # 11 sequences: one batch of 8, the rest dropped
    (b,) = client_batches(a, mode="drop_remainder")  # no shuffle: stream order
    seqs = torch.from_numpy(a[:808].astype(np.int64)).view(8, 101)
    assert torch.equal(b.x, seqs[:, :-1]) and torch.equal(b.y, seqs[:, 1:])


@pytest.mark.parametrize(
    "n, n_batches, n_targets",
    [
        (0, 0, 0),  # empty client
        (1, 0, 0),  # one char has no target
        (2, 1, 1),
        (50, 1, 49),  # the example
        (102, 1, 100),  # 101 + a trailing single char, which is dropped
        (808, 1, 800),  # exactly one full batch
        (900, 2, 800 + 91),  # 8 full sequences + one of 92 chars, then 7 all-PAD rows
    ],
)
def test_padded_keeps_every_target(n, n_batches, n_targets):
    batches = client_batches(ids(n))
    assert len(batches) == n_batches and targets(batches) == n_targets
    for b in batches:
        assert b.x.shape == (8, 100)
        assert (b.y[~b.mask] == PAD_ID).all()  # masked exactly where the target is padding
        assert (b.y[b.mask] != PAD_ID).all()


def test_padded_last_batch_layout():
    a = ids(900)
    last = client_batches(a)[-1]
    assert torch.equal(last.x[0, :91], torch.from_numpy(a[808:899].astype(np.int64)))
    assert torch.equal(last.y[0, :91], torch.from_numpy(a[809:900].astype(np.int64)))
    assert last.mask[0].sum() == 91 and not last.mask[1:].any()
    assert (last.x[1:] == PAD_ID).all()


def test_padded_agrees_with_drop_remainder_on_full_batches():
    a = ids(808 * 3)
    for p, d in zip(client_batches(a), client_batches(a, mode="drop_remainder")):
        assert torch.equal(p.x, d.x) and torch.equal(p.y, d.y) and torch.equal(p.mask, d.mask)


def test_oov_chars_map_to_oov_id():
    (b,) = client_batches(vocab.encode("ab\u00e9c"))
    assert b.x[0, :3].tolist() == [vocab.STOI["a"], vocab.STOI["b"], OOV_ID]
    assert b.y[0, :3].tolist() == [vocab.STOI["b"], OOV_ID, vocab.STOI["c"]]


def test_shuffle_is_deterministic_by_seed():
    a = ids(808 * 5)

    def xs(seed):
        return torch.stack([b.x for b in client_batches(a, shuffle_seed=seed)])

    assert torch.equal(xs(1), xs(1))
    assert not torch.equal(xs(1), xs(2))
    assert not torch.equal(xs(1), xs(None))
    # Shuffling moves whole sequences: the same set of rows, in another order.
    rows = sorted(map(tuple, xs(1).reshape(-1, 100).tolist()))
    assert rows == sorted(map(tuple, xs(None).reshape(-1, 100).tolist()))


@pytest.mark.parametrize("n, buffer", [(500, 100), (50, 100), (10, 1), (300, 7)])
def test_shuffle_order_has_tf_buffer_semantics(n, buffer):
    order = shuffle_order(n, buffer, seed=3)
    assert sorted(order) == list(range(n))
    # Element t is emitted from a buffer holding at most inputs 0 .. t + buffer - 1.
    assert all(order[t] < t + buffer for t in range(n))
    assert list(shuffle_order(n, buffer, seed=None)) == list(range(n))
    if buffer == 1:
        assert list(order) == list(range(n))


def test_max_batches_and_bad_arguments():
    assert len(client_batches(ids(808 * 4), max_batches=2)) == 2
    with pytest.raises(FedtextError, match="mode"):
        client_batches(ids(10), mode="ragged")
    with pytest.raises(FedtextError, match="batch_size"):
        client_batches(ids(10), batch_size=0)


def test_kept_counts_matches_the_batches():
    sizes = [0, 1, 2, 50, 101, 102, 807, 808, 900, 5000]
    counts = kept_counts(np.array(sizes), batch_size=8, seq_len=100)
    pad = [client_batches(ids(n)) for n in sizes]
    drop = [client_batches(ids(n), mode="drop_remainder") for n in sizes]
    assert counts["clients_kept_padded"] == sum(bool(b) for b in pad) == 8
    assert counts["clients_kept_drop_remainder"] == sum(bool(b) for b in drop) == 3
    assert counts["targets_padded"] == sum(targets(b) for b in pad)
    assert counts["targets_drop_remainder"] == sum(targets(b) for b in drop)
    assert counts["batches_padded"] == sum(len(b) for b in pad)
    assert counts["batches_drop_remainder"] == sum(len(b) for b in drop)


def test_random_text_batches():
    a, b = random_text_batches(3, seed=0), random_text_batches(3, seed=0)
    assert len(a) == 3 and a[0].x.shape == (8, 100) and a[0].mask.all()
    assert all(torch.equal(p.x, q.x) for p, q in zip(a, b))
    assert torch.equal(a[0].x[:, 1:], a[0].y[:, :-1])
    xs = torch.stack([p.x for p in a])
    assert xs.min() >= 0 and xs.max() < 86  # the tutorial's characters only
    assert not torch.equal(a[0].x, random_text_batches(1, seed=1)[0].x)
