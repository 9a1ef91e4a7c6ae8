"""`fedtext train` / `fedtext plot` from the command line: outputs, errors, resume after a kill."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import make_clients

from fedtext.cli.main import main
from fedtext.model.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "scratch", "--embed-dim", "8", "--hidden-size", "16", "--rounds", "3",
        "--clients-per-round", "3", "--max-batches", "2", "--client-lr", "1.0", "--seq-len",
        "40", "--threads", "1", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_clients(tmp_path_factory.mktemp("data") / "clients")


def fedtext(*argv):
    return main([str(a) for a in argv])


def one_line_error(capsys, match):
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedtext: error:") and "\n" not in err and "Traceback" not in err
    assert match in err, err
    return err


def test_train_cli_outputs_and_plot(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert fedtext("train", "--out", run, "--data", data_dir, *TINY) == 0
    out = capsys.readouterr().out
    assert "round 3" in out and f"run in {run}" in out
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert {"train_loss", "train_accuracy", "eval_loss", "eval_accuracy", "seconds",
            "chars", "clients"} <= rows[1].keys()
    model, meta = load_checkpoint(run / "final")
    assert model.config.hidden_size == 16 and "fedtext train" in meta["provenance"]["command"]
    assert list((run / "tb").glob("events.out.tfevents.*"))
    # The saved config.toml runs the same experiment again.
    again = tmp_path / "again"
    assert fedtext("train", "--out", again, "--config", run / "config.toml", "--threads", "1",
                   "--no-progress", "--no-tensorboard") == 0
    model2, _ = load_checkpoint(again / "final")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  model2.state_dict().values()))
    # Plot: loss.png and accuracy.png, one run or several compared.
    assert fedtext("plot", run) == 0
    for name in ("loss.png", "accuracy.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fedtext("plot", run, again, "--out", tmp_path / "cmp") == 0
    assert (tmp_path / "cmp" / "loss.png").exists()


def test_cli_errors_exit_2_with_one_line(data_dir, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("client_lrr = 0.1\n")  # a fedtext 0.1 flat file with a typo
    assert fedtext("train", "--out", tmp_path / "a", "--config", bad) == 2
    one_line_error(capsys, "bad.toml: unknown key 'client_lrr' (did you mean 'client_lr'?)")
    bad.write_text("rounds = -3\n")
    assert fedtext("train", "--out", tmp_path / "a", "--config", bad) == 2
    one_line_error(capsys, "bad.toml: [run] rounds must be >= 1, not -3")
    assert fedtext("train", "--out", tmp_path / "a", "--rounds", "0") == 2
    one_line_error(capsys, "--rounds must be >= 1, not 0")
    assert fedtext("train", "--out", tmp_path / "a", "--seq-len", "ten") == 2
    one_line_error(capsys, "--seq-len must be an integer, not 'ten'")
    assert fedtext("train", "--out", tmp_path / "a", "--hidden-size", "8") == 2
    one_line_error(capsys, "needs model = 'scratch'")
    assert fedtext("train", "--out", tmp_path / "a", "--model", tmp_path / "nope") == 2
    one_line_error(capsys, "no such checkpoint")
    assert fedtext("train", "--out", tmp_path / "a", "--data", data_dir, *TINY,
                   "--clients", "CLIENT_1,NOBODY") == 2
    one_line_error(capsys, "unknown client 'NOBODY'")
    assert fedtext("plot", tmp_path / "nothing") == 2
    one_line_error(capsys, "no metrics.jsonl rows")
    assert not (tmp_path / "a").exists()  # nothing was started


def test_cli_refuses_existing_and_other_config_runs(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--out", run, "--data", data_dir, *TINY, "--rounds", "1"]
    assert fedtext(*argv) == 0
    before = (run / "metrics.jsonl").read_text()
    assert fedtext(*argv) == 2
    one_line_error(capsys, "already holds a run (round 1); pass --resume")
    assert fedtext(*argv, "--resume", "--client-lr", "0.3") == 2
    one_line_error(capsys, "was started with client_lr=1.0 (asked: 0.3)")
    assert (run / "metrics.jsonl").read_text() == before  # untouched
    assert fedtext(*argv, "--resume", "--rounds", "2") == 0  # extending is fine
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["round"] == 2


@pytest.mark.slow
def test_resume_after_kill_is_bit_identical(data_dir, tmp_path):
    """Kill `python -m fedtext train` mid-run, resume it: the same final weights."""
    argv = [sys.executable, "-m", "fedtext", "train", "--data", str(data_dir), *TINY,
            "--rounds", "8", "--no-tensorboard"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(argv + ["--out", str(tmp_path / "full")], check=True, env=env,
                   capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(argv + ["--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state, deadline = killed / "state.pt", time.time() + 120
    try:
        while time.time() < deadline:  # wait for the round-2 checkpoint, then kill at once
            if state.exists() and torch.load(state, weights_only=True)["server_state"][
                    "round"] >= 2:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
    at = torch.load(state, weights_only=True)["server_state"]["round"]
    assert 2 <= at < 8 and not (killed / "final").exists()
    r = subprocess.run(argv + ["--out", str(killed), "--resume"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resuming {killed} after round {at}" in r.stdout
    a, _ = load_checkpoint(tmp_path / "full" / "final")
    b, _ = load_checkpoint(killed / "final")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    rows = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    full = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(9))
    assert [r.get("train_loss") for r in rows] == [r.get("train_loss") for r in full]
