"""The experiment loop in-process: metrics rows, eval, run directory, exact resume, refusals."""

import json
import pickle

import numpy as np
import pytest
import torch
from helpers import make_clients

from fedtext.config import FLAGS, ExperimentConfig, load_config, merge
from fedtext.data.batching import client_batches
from fedtext.data.store import load_text_clients
from fedtext.data.tasks import TASKS, ClientData, DataConfig
from fedtext.errors import FedtextError
from fedtext.model.char_rnn import CharRNN, ModelConfig
from fedtext.model.checkpoint import load_checkpoint
from fedtext.run.evaluation import build_eval_set, eval_sample, evaluate, evaluate_batches
from fedtext.run.recorder import METRICS_FILE
from fedtext.run.train import train

TINY = {"model": "scratch", "embed-dim": "8", "hidden-size": "16", "rounds": "3",
        "clients-per-round": "3", "max-batches": "2", "client-lr": "1.0"}
TUTORIAL_TASK = TASKS["tutorial"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_clients(tmp_path_factory.mktemp("data") / "clients")


def tiny(data_dir, **flags):
    """A tiny config on `data_dir`; keyword flags use underscores (client_lr=...)."""
    given = {**TINY, "data": str(data_dir), **{k.replace("_", "-"): v for k, v in flags.items()}}
    return merge(ExperimentConfig(), (FLAGS, given))


def run(cfg, out, **kw):
    return train(cfg, out, progress=False, tensorboard=False, log=lambda s: None, **kw)


REQUIRED = {"round", "clients", "train_loss", "train_accuracy", "eval_loss", "eval_accuracy",
            "seconds", "chars"}


def test_train_writes_rows_config_and_final(data_dir, tmp_path):
    cfg = tiny(data_dir)
    res = run(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["clients"] == 0 and rows[0]["eval_loss"] > 0  # the initial model's eval
    for r in rows[1:]:
        assert REQUIRED <= r.keys() and r["clients"] == 3 and r["chars"] > 0
        assert 0 <= r["eval_accuracy"] <= 1 and len(r["client_ids"]) == 3
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]  # it learns something
    # The saved config is the effective one; the final model is the trained weights.
    saved = load_config(tmp_path / "run" / "config.toml")
    assert saved.client == cfg.client and saved.run == cfg.run and saved.server == cfg.resolved(
    ).server
    assert saved.data.source == str(data_dir.resolve())  # made absolute: works from anywhere
    model, meta = load_checkpoint(tmp_path / "run" / "final")
    for k, v in model.state_dict().items():
        assert torch.equal(v, res.state.params[k])
    assert meta["provenance"]["rounds"] == 3 and meta["provenance"]["kind"] == "federated"


def test_eval_every_and_tensorboard(data_dir, tmp_path):
    res = train(tiny(data_dir, rounds=3, eval_every=2), tmp_path / "run", progress=False,
                log=lambda s: None)
    assert [r.get("eval_loss") is not None for r in res.rows] == [True, False, True, True]
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    for r in res.rows:  # every eval row has the per-client distribution
        if r.get("eval_loss") is not None:
            assert r["eval_accuracy_p10"] <= r["eval_accuracy_p50"] <= r["eval_accuracy_p90"]
            assert 0 <= r["eval_unweighted_accuracy"] <= 1


def test_eval_every_0_turns_evaluation_off(data_dir, tmp_path):
    res = run(tiny(data_dir, rounds=2, eval_every=0), tmp_path / "run")
    assert [r["round"] for r in res.rows] == [1, 2]  # no round-0 row either
    assert all("eval_loss" not in r for r in res.rows) and res.eval_set is None
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("server", [{}, {"server_optimizer": "adam", "server_lr": "0.01"},
                                    {"server_optimizer": "sgdm", "server_lr": "0.5",
                                     "server_lr_schedule": "cosine", "client_lr_warmup": "2"}])
def test_resume_in_process_is_exact(data_dir, tmp_path, server):
    cfg = tiny(data_dir, rounds=4, eval_every=3, **server)
    full = run(cfg, tmp_path / "full")
    part = run(cfg, tmp_path / "part", until_round=2)
    assert part.state.round == 2 and not (tmp_path / "part" / "final").exists()
    resumed = run(cfg, tmp_path / "part", resume=True)
    for k in full.state.params:
        assert torch.equal(full.state.params[k], resumed.state.params[k])
    assert [r["train_loss"] for r in resumed.rows[1:]] == [r["train_loss"] for r in full.rows[1:]]
    # Evaluated after rounds 0, 3 and 4 (the last) in both: stopping early forces no eval.
    assert [r.get("eval_loss") for r in resumed.rows] == [r.get("eval_loss") for r in full.rows]
    assert [r.get("eval_loss") is not None for r in full.rows] == [True, False, False, True, True]
    assert type(resumed.state.opt_state) is type(full.state.opt_state)


def test_resume_after_a_kill_between_row_and_state(data_dir, tmp_path):
    cfg = tiny(data_dir, rounds=3)
    run(cfg, tmp_path / "run", until_round=2)
    # A kill after round 3's row was written but before its state was: the row goes away.
    with (tmp_path / "run" / METRICS_FILE).open("a") as f:
        f.write(json.dumps({"round": 3, "train_loss": 123.0}) + "\n{\"round\": 4, \"tr")
    res = run(cfg, tmp_path / "run", resume=True)
    assert [r["round"] for r in res.rows] == [0, 1, 2, 3] and res.rows[-1]["train_loss"] != 123


def test_resume_may_extend_rounds(data_dir, tmp_path):
    run(tiny(data_dir, rounds=2), tmp_path / "run")
    res = run(tiny(data_dir, rounds=3), tmp_path / "run", resume=True,
              sources=[(FLAGS, {"rounds": "3"})])
    assert res.state.round == 3 and [r["round"] for r in res.rows] == [0, 1, 2, 3]
    with pytest.raises(FedtextError, match="already finished its 3 rounds"):
        run(tiny(data_dir, rounds=3), tmp_path / "run", resume=True)
    with pytest.raises(FedtextError, match="already at round 3, past --rounds 2"):
        run(tiny(data_dir), tmp_path / "run", resume=True, sources=[(FLAGS, {"rounds": "2"})])


def test_refusals(data_dir, tmp_path):
    cfg = tiny(data_dir, rounds=1)
    run(cfg, tmp_path / "run")
    with pytest.raises(FedtextError, match="already holds a run.*--resume"):
        run(cfg, tmp_path / "run")
    with pytest.raises(FedtextError, match=r"was started with client_lr=1.0 \(asked: 0.1\); only"):
        run(cfg, tmp_path / "run", resume=True, sources=[(FLAGS, {"client-lr": "0.1"})])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FedtextError, match="not an empty directory"):
        run(cfg, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(FedtextError, match="holds no run"):
        run(cfg, tmp_path / "nothing", resume=True)


def test_unknown_and_too_small_clients(data_dir, tmp_path):
    with pytest.raises(FedtextError, match="unknown client 'NOPE'"):
        run(tiny(data_dir, clients="NOPE"), tmp_path / "a")
    with pytest.raises(FedtextError, match="no batch of 64x100 without padding"):
        run(tiny(data_dir, clients="CLIENT_0", drop_remainder=True, batch_size="64"),
            tmp_path / "b")
    with pytest.raises(FedtextError, match="clients_per_round 50"):
        run(tiny(data_dir, clients_per_round=50), tmp_path / "c")


def test_fixed_clients_and_eval_ids(data_dir, tmp_path):
    res = run(tiny(data_dir, clients="CLIENT_1,CLIENT_2", eval_client_ids="CLIENT_3",
                   rounds="2"), tmp_path / "run")
    assert all(r["client_ids"] == ["CLIENT_1", "CLIENT_2"] for r in res.rows[1:])
    assert res.eval_set.client_ids == ("CLIENT_3",)


def test_eval_set_matches_central_evaluate(data_dir):
    ds = load_text_clients(data_dir)
    ids = eval_sample(ds.test, None, seed=0)
    es = build_eval_set(ds.test, ids, TUTORIAL_TASK, DataConfig(seq_len=30))
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(embed_dim=8, hidden_size=16))
    r = evaluate(model, es, rows=7)  # chunking must not matter
    batches = [b for cid in ids for b in client_batches(ds.test.chars(cid), seq_len=30)]
    ref = evaluate_batches(model, batches)
    assert r["eval_chars"] == ref.predictions == es.chars
    assert r["eval_loss"] == pytest.approx(ref.loss, rel=1e-6)
    assert r["eval_accuracy"] == pytest.approx(ref.accuracy, rel=1e-9)
    # Per client: the unweighted mean is the mean of each client evaluated alone.
    per = [evaluate_batches(model, client_batches(ds.test.chars(c), seq_len=30)) for c in ids]
    assert r["eval_unweighted_accuracy"] == pytest.approx(np.mean([p.accuracy for p in per]))
    assert r["eval_accuracy_p10"] <= r["eval_accuracy_p50"] <= r["eval_accuracy_p90"]


def test_eval_sample_is_seeded(data_dir):
    ds = load_text_clients(data_dir)
    a, b = eval_sample(ds.test, 3, seed=1), eval_sample(ds.test, 3, seed=1)
    assert a == b and len(set(a)) == 3
    assert eval_sample(ds.test, None, seed=1) == list(ds.test.client_ids)
    assert {tuple(eval_sample(ds.test, 3, seed=s)) for s in range(10)} != {tuple(a)}


def test_client_data_is_a_small_picklable_name(data_dir):
    cfg = DataConfig(source=str(data_dir), batch_size=4, seq_len=20)
    data = ClientData(str(data_dir), "CLIENT_0", cfg, max_batches=3)
    blob = pickle.dumps(data)
    assert len(blob) < 1000  # names the data, never carries it
    again = pickle.loads(blob)
    a, b = data(0, 7), again(0, 7)
    assert len(a) == 3 and all(torch.equal(x.x, y.x) for x, y in zip(a, b))
    assert not torch.equal(data(1, 7)[0].x, a[0].x)  # each epoch reshuffles
    ds = load_text_clients(data_dir)
    ref = client_batches(ds.train.chars("CLIENT_0"), batch_size=4, seq_len=20,
                         shuffle_seed=7, max_batches=3)
    assert all(torch.equal(x.x, y.x) and torch.equal(x.mask, y.mask) for x, y in zip(a, ref))
