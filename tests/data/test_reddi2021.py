"""The reddi2021 task (TFF's tff.simulation.baselines.shakespeare) on hand-made snippets:
vocabulary, [BOS] + chars + [EOS] per snippet, padding to multiples of 81, the snippet shuffle,
the short last batch, the PAD-only mask, no client dropped; and the model's 820,522 params."""

import numpy as np
import pytest
import torch

from fedtext.data import vocab as V
from fedtext.data.batching import shuffle_order, snippet_batches
from fedtext.data.store import ClientStore
from fedtext.data.tasks import TASKS, DataConfig
from fedtext.model.spec import ModelSpec, load_initial_model

TASK = TASKS["reddi2021"]
VOCAB = V.REDDI2021
PAD, OOV, BOS, EOS = 0, 87, 88, 89
CFG = DataConfig(task="reddi2021", batch_size=4, seq_len=80, shuffle_buffer=50)


def rows(batches):
    """All (x, y, mask) rows of the batches, (R, 80) each."""
    return (torch.cat([b.x for b in batches]), torch.cat([b.y for b in batches]),
            torch.cat([b.mask for b in batches]))


def test_vocabulary_is_tffs():
    # char_prediction_preprocessing.get_special_tokens and its test's expected ids.
    assert VOCAB.size == 90 and (VOCAB.pad_id, VOCAB.oov_id, VOCAB.bos_id, VOCAB.eos_id) == (
        PAD, OOV, BOS, EOS)
    assert VOCAB.encode("abc").tolist() == [64, 42, 21]  # TFF: 'abc' -> [bos, 64, 42, 21, eos]
    assert VOCAB.encode("a\r~").tolist() == [64, 86, OOV]  # TFF: [bos, 64, 86, oov, eos]
    assert VOCAB.encode("d").tolist() == [1]  # CHAR_VOCAB[0] is id 1: 0 is PAD
    # The store keeps tutorial ids; the task maps them (OOV too) in one lookup.
    table = VOCAB.from_store_table()
    assert table[V.TUTORIAL.encode("abc\r")].tolist() == [64, 42, 21, 86]
    assert table[V.TUTORIAL.oov_id] == OOV


def test_one_snippet_bos_eos_and_padding():
    store = ClientStore.from_texts({"A": ["abc", "xyz"], "B": ["hi"]})
    (b,) = TASK.batches(store, "A", CFG)  # no shuffle seed: snippet order kept
    assert b.x.shape == b.y.shape == b.mask.shape == (4, 80)
    # Snippet 1: [BOS] a b c [EOS] then PAD up to 81; snippet 2 its own row.
    abc, xyz = VOCAB.encode("abc").tolist(), VOCAB.encode("xyz").tolist()
    assert b.x[0, :5].tolist() == [BOS, *abc, EOS] and (b.x[0, 5:] == PAD).all()
    assert b.y[0, :5].tolist() == [*abc, EOS, PAD] and (b.y[0, 5:] == PAD).all()
    assert b.x[1, :5].tolist() == [BOS, *xyz, EOS]
    # Targets: 3 chars + EOS per snippet count; PAD never does; BOS is never a target.
    assert b.mask[0].tolist() == [True] * 4 + [False] * 76
    assert int(b.mask.sum()) == 8
    # The short last batch is kept (TFF's batch(4) without drop_remainder): rows 2, 3 are
    # all-PAD fill, masked everywhere.
    assert (b.x[2:] == PAD).all() and not b.mask[2:].any()


def test_a_long_snippet_is_cut_into_81s_and_padded_per_snippet():
    text = "ab" * 100  # 200 chars -> 202 tokens -> 3 rows of 81 (243 slots, 41 PAD)
    ids = VOCAB.encode(text)
    (b,) = snippet_batches(ids, np.array([200]), bos_id=BOS, eos_id=EOS, pad_id=PAD)
    seq = torch.cat([torch.tensor([BOS]), torch.from_numpy(ids.astype(np.int64)),
                     torch.tensor([EOS]), torch.zeros(41, dtype=torch.int64)]).view(3, 81)
    assert torch.equal(b.x[:3], seq[:, :-1]) and torch.equal(b.y[:3], seq[:, 1:])
    # Every row but the first starts with a char that is only an input (TFF's chunking);
    # the PAD-only mask counts 200 + 1 (EOS) - 2 (the chars at rows 2 and 3's position 0).
    assert int(b.mask.sum()) == 199
    assert torch.equal(b.mask, b.y != PAD)


def test_exact_multiple_of_81_adds_no_padding_row():
    ids = VOCAB.encode("a" * 79)  # 79 + 2 = 81 tokens: exactly one row
    (b,) = snippet_batches(ids, np.array([79]), bos_id=BOS, eos_id=EOS, pad_id=PAD,
                           batch_size=1)
    assert b.x[0, 0] == BOS and b.y[0, -1] == EOS and b.mask.all()


def test_eos_and_oov_targets_count_only_pad_is_masked():
    store = ClientStore.from_texts({"A": ["a~b", "c"]})  # '~' is outside the 86 chars
    (b,) = TASK.batches(store, "A", CFG)
    x, y, m = rows([b])
    assert OOV in y[0].tolist() and EOS in y[0].tolist()
    assert torch.equal(m, y != PAD)
    assert int(m.sum()) == (3 + 1) + (1 + 1)


def test_shuffle_is_over_snippets_with_tffs_buffer():
    # 60 one-row snippets whose first char names them: the rows come out in the order of
    # shuffle_order over snippets (TF's buffered shuffle, buffer 50), each snippet whole.
    texts = [VOCAB.chars[i % 86] * (40 + i) for i in range(60)]  # 42..101 tokens: 1-2 rows
    store = ClientStore.from_texts({"A": texts})
    batches = TASK.batches(store, "A", CFG, shuffle_seed=7)
    x, y, m = rows(batches)
    starts = [int(r) for r in torch.nonzero(x[:, 0] == BOS)[:, 0]]
    emitted = [int(x[r, 1]) - 1 for r in starts]  # first char id - 1 = the snippet's index
    order = shuffle_order(60, 50, 7)
    assert [int(i) % 86 for i in order] == emitted
    # A snippet's rows stay together and in order: its chars continue into the next row.
    lens = np.array([len(t) for t in texts])[order]
    assert len(starts) == 60 and np.all(np.diff(starts + [len(x)]) == -(-(lens + 2) // 81))
    # Another seed, another order; no seed, the store's order.
    assert not np.array_equal(shuffle_order(60, 50, 8), order)
    unshuffled = TASK.batches(store, "A", CFG)
    assert [int(unshuffled[0].x[i, 0]) for i in range(2)] == [BOS, BOS]
    assert int(unshuffled[0].x[0, 1]) == 1


def test_nothing_is_dropped():
    # Tiny clients (one 1-char snippet) still make a batch with targets; the eval path
    # (padded=True) and training give the same rows without a shuffle.
    store = ClientStore.from_texts({"A": ["a"], "B": ["to be or not", "x" * 300]})
    for cid, chars, snippets in (("A", 1, 1), ("B", 312, 2)):
        batches = TASK.batches(store, cid, CFG)
        assert batches, cid
        n_rows = sum(int(b.mask.any(1).sum()) for b in batches)
        targets = sum(int(b.mask.sum()) for b in batches)
        # chars + one EOS per snippet, minus the first char of every continuation row.
        assert targets == chars + snippets - (n_rows - snippets)
    drop = DataConfig(task="reddi2021", batch_size=4, seq_len=80, drop_remainder=True)
    assert TASK.batches(store, "A", drop) == []  # TF's batch(4, drop_remainder=True)


def test_model_defaults_match_tffs_820522_parameters():
    model = load_initial_model(ModelSpec(init="scratch"), TASK.vocab, TASK.model_defaults, 0)
    assert model.num_params() == 820_522
    c = model.config
    assert (c.vocab_size, c.embed_dim, c.hidden_size, c.num_layers, c.cell) == (
        90, 8, 256, 2, "lstm")
    # he_normal input kernels (truncated at 2 std of sqrt(2 / fan_in) / 0.8796).
    for k, fan_in in ((0, 8), (1, 256)):
        w = model.rnn.layer_weights(k)[0].detach()
        std = (2 / fan_in) ** 0.5 / 0.87962566103423978
        assert w.abs().max() <= 2 * std + 1e-6
        assert float(w.std()) == pytest.approx((2 / fan_in) ** 0.5, rel=0.05)
    # Keras' unit_forget_bias: the forget gate's bias starts at 1, the others at 0.
    b = model.rnn.layer_weights(0)[2]
    assert (b[256:512] == 1).all() and (b[:256] == 0).all() and (b[512:] == 0).all()
