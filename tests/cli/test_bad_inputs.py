"""User mistakes, tried as a new user would: each is one line on stderr and exit 2, never a
traceback, and nothing already written is lost."""

import json
import os
import stat

import pytest
import torch
from helpers import make_clients

from fedtext.cli.main import main
from fedtext.run.state import RunLock

TINY = ["--model", "scratch", "--embed-dim", "4", "--hidden-size", "8", "--rounds", "2",
        "--clients-per-round", "2", "--max-batches", "1", "--seq-len", "20",
        "--threads", "1", "--no-progress", "--no-tensorboard"]
PRE = ["--embed-dim", "4", "--hidden-size", "8", "--batch-size", "2", "--seq-len", "8",
       "--warmup-steps", "1", "--val-frac", "0.1", "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_clients(tmp_path_factory.mktemp("data") / "clients")
    (root / "LONELY.txt").write_text("only one speech here\n")  # < 2 snippets: left out
    return root


@pytest.fixture
def corpus(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("Now is the winter of our discontent\nMade glorious summer by this sun.\n" * 4)
    return f


def fedtext(*argv):
    return main([str(a) for a in argv])


def one_line(capsys, *fragments):
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedtext: error:") and "\n" not in err and "Traceback" not in err
    for f in fragments:
        assert f in err, err
    return err


def test_out_naming_an_existing_file(data, corpus, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("mine")
    assert fedtext("train", "--out", f, "--data", data, *TINY) == 2
    one_line(capsys, "is a file, not a directory")
    assert fedtext("pretrain", "--out", f, "--corpus", corpus, "--steps", "1", *PRE) == 2
    one_line(capsys, "is a file, not a directory")
    assert fedtext("plot", f) == 2
    one_line(capsys, "is a file")
    assert fedtext("train", "--out", f / "sub", "--data", data, *TINY) == 2
    one_line(capsys, "cannot write there")
    assert f.read_text() == "mine"


def test_absurd_learning_rates(data, corpus, tmp_path, capsys):
    assert fedtext("train", "--out", tmp_path / "a", "--data", data, *TINY,
                   "--client-lr", "1e308") == 2
    one_line(capsys, "--client-lr must be a finite number > 0 (at most 3.4e+38")
    assert fedtext("pretrain", "--out", tmp_path / "b", "--corpus", corpus, "--steps", "1",
                   "--lr", "nan", *PRE) == 2
    one_line(capsys, "--lr must be a finite number, not nan")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_diverging_run_stops_and_keeps_its_last_good_round(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert fedtext("train", "--out", run, "--data", data, *TINY, "--server-lr", "1e300") == 2
    one_line(capsys, "round 1:", "non-finite", "keeps round 0")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0]  # no NaN row written
    state = torch.load(run / "state.pt", weights_only=True)
    assert state["server_state"]["round"] == 0
    assert all(torch.isfinite(v).all() for v in state["server_state"]["params"].values())


def test_huge_batches_are_refused_before_allocating(data, tmp_path, capsys):
    assert fedtext("train", "--out", tmp_path / "r", "--data", data, *TINY, "--batch-size",
                   "100000", "--seq-len", "100000") == 2
    one_line(capsys, "GiB per training step", "lower --batch-size or --seq-len")


def test_a_state_file_missing_keys(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert fedtext("train", "--out", run, "--data", data, *TINY) == 0
    state = torch.load(run / "state.pt", weights_only=True)
    del state["config"]
    torch.save(state, run / "state.pt")
    assert fedtext("train", "--out", run, "--data", data, *TINY, "--resume") == 2
    one_line(capsys, "state.pt lacks config")
    (run / "state.pt").write_bytes(b"not a torch file")
    assert fedtext("train", "--out", run, "--data", data, *TINY, "--resume") == 2
    one_line(capsys, "cannot read")


def test_two_processes_on_one_run_directory(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert fedtext("train", "--out", run, "--data", data, *TINY) == 0
    before = (run / "metrics.jsonl").read_text()
    with RunLock(run):  # another fedtext holds the run
        assert fedtext("train", "--out", run, "--data", data, *TINY, "--resume",
                       "--rounds", "3") == 2
        one_line(capsys, "in use by another fedtext process", f"pid {os.getpid()}")
    assert (run / "metrics.jsonl").read_text() == before
    assert fedtext("train", "--out", run, "--data", data, *TINY, "--resume", "--rounds",
                   "3") == 0  # the lock went with its holder


def test_a_left_out_client_is_named_as_left_out(data, tmp_path, capsys):
    assert fedtext("train", "--out", tmp_path / "r", "--data", data, *TINY,
                   "--clients", "LONELY") == 2
    one_line(capsys, "'LONELY' was left out", "fewer than 2 snippets")


def test_empty_paths(tmp_path, capsys):
    assert fedtext("train", "--out", tmp_path / "r", "--data", "") == 2
    one_line(capsys, "--data must not be empty")
    assert fedtext("data", "stats", "--data", "") == 2
    one_line(capsys, "data path is empty")


def test_toml_mistakes(data, tmp_path, capsys):
    f = tmp_path / "c.toml"
    f.write_text("client = 3\n")
    assert fedtext("train", "--out", tmp_path / "r", "--config", f) == 2
    one_line(capsys, "[client] must be a table")
    f.write_text("rounds = 3\n[client]\nlr = 0.5\n")
    assert fedtext("train", "--out", tmp_path / "r", "--config", f) == 2
    one_line(capsys, "fedtext 0.1 flat key", "[run]")


def test_an_unwritable_cache(data, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert fedtext("data", "stats", "--cache-dir", f / "cache") == 2
    one_line(capsys, "cannot write the data cache", "--cache-dir")


def test_plots_are_ordinary_files_and_pretrain_runs_plot(corpus, data, tmp_path, capsys):
    run = tmp_path / "pre"
    assert fedtext("pretrain", "--out", run, "--corpus", corpus, "--steps", "4",
                   "--eval-every", "2", *PRE) == 0
    assert fedtext("plot", run) == 0
    for name in ("loss.png", "accuracy.png"):
        mode = stat.S_IMODE((run / name).stat().st_mode)
        assert mode & 0o044, oct(mode)  # readable by others, as the umask allows
    train = tmp_path / "train"
    assert fedtext("train", "--out", train, "--data", data, *TINY) == 0
    capsys.readouterr()
    assert fedtext("plot", run, train) == 2
    one_line(capsys, "cannot plot federated runs (rounds) and pretrain runs (steps)")


def test_resume_beyond_or_at_the_end(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert fedtext("train", "--out", run, "--data", data, *TINY, "--rounds", "3") == 0
    assert fedtext("train", "--out", run, "--data", data, *TINY, "--resume", "--rounds",
                   "2") == 2
    one_line(capsys, "already at round 3, past --rounds 2")
    assert fedtext("train", "--out", run, "--data", data, *TINY, "--resume",
                   "--rounds", "3") == 2
    one_line(capsys, "already finished its 3 rounds")


@pytest.mark.parametrize("argv", [
    ["train", "--out", "OUT", "--device", "{dev}"],
    ["pretrain", "--out", "OUT", "--steps", "1", "--device", "{dev}"],
    ["evaluate", "--model", "pretrained", "--device", "{dev}"],
    ["generate", "--model", "pretrained", "--prompt", "a", "--device", "{dev}"],
])
def test_devices_that_are_not_here(argv, tmp_path, capsys):
    import torch

    for dev, msg in (("tpu", "is not a device"), ("cuda:x", "is not a device")) + (
            (("cuda", "no CUDA"),) if not torch.cuda.is_available() else ()):
        assert fedtext(*[a.replace("OUT", str(tmp_path / "r")).replace("{dev}", dev)
                         for a in argv]) == 2
        one_line(capsys, msg)
    assert not (tmp_path / "r").exists()
