"""One round of our fed_avg against one round of real TensorFlow Federated FedAvg.

The reference (tests/reference/fedavg_round_small.npz, see its README) is TFF 0.87's
build_weighted_fed_avg on Embedding(86,16) -> GRU(64, reset_after=True) -> Dense(86): 3 clients
x 5 batches of (8, 100), client SGD lr 0.5, server SGD lr 1.0, NUM_EXAMPLES weighting. We start
from the same Keras weights, run one round on the same batches, and compare the new global
weights and the round's loss / accuracy / counts.
"""

import numpy as np
import pytest
import torch
from helpers import REFERENCE

from fedtext.data.batching import Batch
from fedtext.fl.algorithm import fed_avg
from fedtext.fl.client import ClientConfig
from fedtext.fl.server_optimizers import sgd
from fedtext.model.char_rnn import ModelConfig
from fedtext.model.keras import keras_to_state_dict, state_dict_to_keras

REF = REFERENCE / "fedavg_round_small.npz"

H = 64
PERM = np.r_[H:2 * H, 0:H, 2 * H:3 * H]  # Keras gate blocks [z|r|h] -> torch [r|z|n]
INV = np.argsort(PERM)


def hand_keras_to_torch(w: dict) -> dict:
    """The mapping written out by hand, to check the library's against."""
    t = {
        "embedding.weight": w["embedding.embeddings"],
        "rnn.weight_ih_l0": w["gru.kernel"][:, PERM].T,  # (3H, E)
        "rnn.weight_hh_l0": w["gru.recurrent_kernel"][:, PERM].T,  # (3H, H)
        "rnn.bias_ih_l0": w["gru.bias"][0][PERM],
        "rnn.bias_hh_l0": w["gru.bias"][1][PERM],
        "head.weight": w["dense.kernel"].T,  # (V, H)
        "head.bias": w["dense.bias"],
    }
    return {k: torch.tensor(np.ascontiguousarray(v)) for k, v in t.items()}


def keras_to_torch(w: dict) -> dict:
    return keras_to_state_dict(w, vocab_size=86)


def torch_to_keras(p: dict) -> dict:
    return state_dict_to_keras(p)


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(REF))


def test_mapping_round_trips(ref):
    init = {k[5:]: v for k, v in ref.items() if k.startswith("init.")}
    hand = hand_keras_to_torch(init)
    lib = keras_to_torch(init)
    assert hand.keys() == lib.keys() and all(torch.equal(hand[k], lib[k]) for k in hand)
    back = torch_to_keras(keras_to_torch(init))
    assert back.keys() == init.keys()
    for k in init:
        np.testing.assert_array_equal(back[k], init[k])


def test_one_round_matches_tff(ref):
    init = {k[5:]: v for k, v in ref.items() if k.startswith("init.")}
    x, y = torch.from_numpy(ref["x"]), torch.from_numpy(ref["y"])  # (3, 5, 8, 100)
    ones = torch.ones(x.shape[2:], dtype=torch.bool)  # every target counts
    clients = [(str(cid), [Batch(x[c, b], y[c, b], ones) for b in range(x.shape[1])])
               for c, cid in enumerate(ref["client_ids"])]

    cfg = ClientConfig(model=ModelConfig(vocab_size=86, embed_dim=16, hidden_size=H), lr=0.5)
    algorithm = fed_avg(cfg, sgd(lr=1.0), weighting="examples")
    state, metrics = algorithm.apply(algorithm.init(keras_to_torch(init)), clients)

    ours = torch_to_keras(state.params)
    rel = {}
    for k in init:
        tff = ref[f"global.{k}"]
        rel[k] = float(np.abs(ours[k] - tff).max() / np.abs(tff).max())
        # The round must have moved every tensor, or the comparison proves little.
        assert np.abs(tff - init[k]).max() > 1e-4, k
    print("max relative weight diff per tensor:", rel)
    print("loss diff", metrics["train_tff_loss"] - float(ref["round_loss"]),
          "accuracy diff", metrics["train_accuracy"] - float(ref["round_accuracy"]))
    assert max(rel.values()) < 1e-5, rel
    assert metrics["train_tff_loss"] == pytest.approx(float(ref["round_loss"]), abs=1e-4)
    assert metrics["train_accuracy"] == pytest.approx(float(ref["round_accuracy"]), abs=1e-4)
    # Full batches: the token-weighted loss is TFF's loss too.
    assert metrics["train_loss"] == pytest.approx(metrics["train_tff_loss"], rel=1e-6)
    assert metrics["num_examples"] == int(ref["round_num_examples"]) == 120
    assert metrics["num_batches"] == int(ref["round_num_batches"]) == 15
    assert metrics["chars"] == 15 * 8 * 100
    correct = sum(m["correct"] for m in metrics["client_metrics"])
    assert correct == round(float(ref["round_accuracy"]) * 12000) == 1568  # README: 1568 / 12000
    assert [m["weight"] for m in metrics["client_metrics"]] == [40.0, 40.0, 40.0]


def test_pre_step_batch_losses_match_keras_replay(ref):
    """Each client's first batch loss is the initial model's loss (pre-step), as in TFF."""
    init = {k[5:]: v for k, v in ref.items() if k.startswith("init.")}
    x, y = torch.from_numpy(ref["x"]), torch.from_numpy(ref["y"])
    ones = torch.ones(x.shape[2:], dtype=torch.bool)
    cfg = ClientConfig(model=ModelConfig(vocab_size=86, embed_dim=16, hidden_size=H), lr=0.5,
                       max_batches=1)
    algorithm = fed_avg(cfg, weighting="examples")
    clients = [(c, [Batch(x[c, b], y[c, b], ones) for b in range(5)]) for c in range(3)]
    _, metrics = algorithm.apply(algorithm.init(keras_to_torch(init)), clients)
    got = [m["loss"] for m in metrics["client_metrics"]]
    np.testing.assert_allclose(got, ref["replay_batch_loss"][:, 0], rtol=1e-5)
