"""`fedtext tutorial` end to end with a tiny checkpoint (the shipped model is GRU 1024)."""

import json

import pytest
import torch
from helpers import make_clients

from fedtext.cli.main import main
from fedtext.config import load_config
from fedtext.model.char_rnn import CharRNN, ModelConfig
from fedtext.model.checkpoint import save_checkpoint
from fedtext.run.tutorial import PROMPT, SEED_CLIENTS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(embed_dim=8, hidden_size=16))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", model, {"kind": "test"})


def rows_of(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_tutorial_end_to_end(tiny_ckpt, tmp_path, capsys):
    data = make_clients(tmp_path / "clients")
    run = tmp_path / "tut"
    assert main(["tutorial", "--model", str(tiny_ckpt), "--data", str(data), "--out", str(run),
                 "--rounds", "2", "--clients-per-round", "3", "--eval-clients", "5",
                 "--seq-len", "40", "--threads", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    for step in ("1. Load", "2. Generate", "3. Evaluate", "4. Federated training",
                 "5. Generate again", "6. Before / after"):
        assert step in out
    assert out.count(PROMPT) == 2  # before and after
    assert "random text (10 batches): accuracy" in out and "held-out accuracy" in out
    assert "a fixed sample of 5 test clients" in out and f"run: {run}" in out
    rows = rows_of(run)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["eval_clients"] == 5 and r["eval_accuracy"] is not None for r in rows)
    assert all(r["clients"] == 3 for r in rows[1:])
    assert (run / "final" / "model.safetensors").exists()


def test_tutorial_seed_settings_on_shakespeare(tiny_ckpt, tmp_path, capsys):
    run = tmp_path / "seed"
    assert main(["tutorial", "--seed-settings", "--model", str(tiny_ckpt), "--out", str(run),
                 "--rounds", "2", "--max-batches", "2", "--threads", "1", "--no-progress",
                 "--length", "20"]) == 0
    out = capsys.readouterr().out
    assert "the same 3 clients every round" in out and "(drop_remainder)" in out
    assert "KING_LEAR_KING_LEAR (5 batches)" in out  # the seed's example character
    cfg = load_config(run / "config.toml")
    assert cfg.sampling.clients == SEED_CLIENTS and cfg.data.drop_remainder
    assert cfg.aggregator.weighting == "examples"
    rows = rows_of(run)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["client_ids"] == list(SEED_CLIENTS) for r in rows[1:])
    assert all(r["eval_clients"] == 3 for r in rows)
    # drop_remainder, 2 full batches of 8 x 100 from each of the 3 clients.
    assert all(r["chars"] == 3 * 2 * 8 * 100 for r in rows[1:])


def test_tutorial_without_the_shipped_model(tmp_path, capsys, monkeypatch):
    """An installation without the shipped model: one clear line, exit 2."""
    monkeypatch.setattr("fedtext.model.checkpoint.PRETRAINED_DIR", tmp_path / "no-model")
    assert main(["tutorial", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedtext: error:") and "--model" in err and "\n" not in err
