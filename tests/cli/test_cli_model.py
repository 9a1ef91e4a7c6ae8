"""`fedtext pretrain | evaluate | generate` end to end on tiny settings, exit codes included."""

import json
import math

import pytest
import torch

from fedtext.cli.main import main
from fedtext.data.store import load_shakespeare
from fedtext.data.vocab import STOI
from fedtext.model.char_rnn import CharRNN, ModelConfig
from fedtext.model.checkpoint import save_checkpoint
from fedtext.pretrain import STATE_FILE, load_train_state

TINY = ["--embed-dim", "8", "--hidden-size", "16"]
FAST = ["--batch-size", "2", "--seq-len", "8", "--eval-every", "2", "--ckpt-every", "2",
        "--warmup-steps", "1", "--val-frac", "0.1", "--no-progress"]


@pytest.fixture
def corpus(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("Now is the winter of our discontent\nMade glorious summer by this sun of York;\n"
                 * 5)
    return f


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(embed_dim=8, hidden_size=16))
    return save_checkpoint(tmp_path_factory.mktemp("m") / "tiny", model, {"steps": 0})


def test_pretrain_then_resume(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    args = ["pretrain", "--out", str(out), "--corpus", str(corpus), *TINY, *FAST]
    assert main([*args, "--steps", "4"]) == 0
    assert "model in" in capsys.readouterr().out
    assert (out / "model" / "config.json").is_file() and (out / "metrics.jsonl").is_file()
    prov = json.loads((out / "model" / "config.json").read_text())["provenance"]
    assert prov["steps"] == 4 and prov["corpus"] == str(corpus) and "command" in prov
    # again without --resume: refused, nothing overwritten
    assert main([*args, "--steps", "4"]) == 2
    assert "--resume" in capsys.readouterr().err
    # --resume takes the run's own settings; more steps is allowed
    assert main(["pretrain", "--out", str(out), "--resume", "--steps", "6", "--no-progress"]) == 0
    assert load_train_state(out / STATE_FILE)["step"] == 6
    # but another architecture is not
    assert main(["pretrain", "--out", str(out), "--resume", "--hidden-size", "32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedtext: error: --resume") and "hidden_size=16" in err
    # the run directory works as --model
    assert main(["generate", "--model", str(out), "--prompt", "Now", "--length", "5",
                 "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("Now")


@pytest.mark.parametrize("argv, message", [
    (["--corpus", "missing.txt"], "missing.txt"),
    (["--steps", "0"], "--steps"),
    (["--hidden-size", "0"], "hidden_size"),
    (["--threads", "0"], "--threads"),
    (["--resume"], "train_state.pt missing"),
])
def test_pretrain_user_errors(tmp_path, corpus, capsys, argv, message):
    base = ["pretrain", "--out", str(tmp_path / "r"), "--corpus", str(corpus), *TINY, *FAST]
    assert main([*base, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedtext: error:") and message in err and "Traceback" not in err


def test_generate_streams_and_repeats_per_seed(ckpt, capsys):
    argv = ["generate", "--model", str(ckpt), "--prompt", "ROMEO:", "--length", "40",
            "--seed", "3"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:") and len(first) == len("ROMEO:") + 40 + 1
    assert main(argv) == 0
    assert capsys.readouterr().out == first
    assert main([*argv, "--num-samples", "2"]) == 0
    two = capsys.readouterr().out.split("\n---\n")
    assert len(two) == 2 and two[0] == first[:-1]  # sample 0 uses --seed itself


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "na\u00efve"], "'\u00ef'"),
    (["--prompt", "a", "--top-k", "0"], "--top-k"),
    (["--prompt", "a", "--num-samples", "0"], "--num-samples"),
])
def test_generate_user_errors(ckpt, capsys, argv, message):
    assert main(["generate", "--model", str(ckpt), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedtext: error:") and message in err


def test_generate_missing_model(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "a"]) == 2
    assert "nope" in capsys.readouterr().err


def test_evaluate_random_json(ckpt, capsys):
    assert main(["evaluate", "--model", str(ckpt), "--random", "--max-batches", "20",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["split"] == "random" and r["predictions"] == 20 * 8 * 100
    assert abs(r["accuracy"] - 1 / 86) < 0.01
    assert r["bits_per_char"] == pytest.approx(r["loss"] / 0.6931471805599453)


def test_evaluate_random_text_output(ckpt, capsys):
    assert main(["evaluate", "--model", str(ckpt), "--random", "--max-batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "1,600 predictions" in out and "accuracy" in out and "bits/char" in out


def test_evaluate_user_errors(ckpt, capsys):
    assert main(["evaluate", "--model", str(ckpt), "--random", "--clients", "a"]) == 2
    assert "--clients" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(ckpt), "--random", "--max-batches", "0"]) == 2
    assert "--max-batches" in capsys.readouterr().err


@pytest.fixture(scope="module")
def e_model(tmp_path_factory):
    """A checkpoint that always predicts 'e' (head weight 0, bias 3 on 'e')."""
    model = CharRNN(ModelConfig(embed_dim=8, hidden_size=16))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[STOI["e"]] = 3.0
    return save_checkpoint(tmp_path_factory.mktemp("m") / "e", model)


def test_evaluate_hand_made_dataset(tmp_path, e_model, capsys):
    data = tmp_path / "clients.jsonl"
    records = [("A", "eeeee", "test"), ("A", "eeeee", "test"), ("B", "ab", "test"),
               ("A", "train text", "train"), ("B", "more", "train")]
    data.write_text("".join(json.dumps({"client_id": c, "text": t, "split": s}) + "\n"
                            for c, t, s in records))
    argv = ["evaluate", "--model", str(e_model), "--data", str(data), "--json"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    # A: "eeeeeeeeee" -> 9 targets, all 'e'; B: "ab" -> 1 target 'b'. 10 predictions, 9 right.
    assert (r["split"], r["clients"], r["predictions"]) == ("test", 2, 10)
    assert r["accuracy"] == pytest.approx(0.9)
    z = math.log(87 + math.exp(3.0))
    assert r["loss"] == pytest.approx((9 * (z - 3) + z) / 10, rel=1e-6)
    assert main([*argv, "--clients", "B"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["clients"], r["predictions"], r["accuracy"]) == (1, 1, 0.0)
    assert main([*argv, "--clients", "B,Z"]) == 2
    assert "'Z'" in capsys.readouterr().err
    assert main([*argv, "--clients", ""]) == 2
    assert "--clients" in capsys.readouterr().err


def test_evaluate_shakespeare_clients(tmp_path, ckpt, capsys):
    cache = str(tmp_path / "cache")
    argv = ["evaluate", "--model", str(ckpt), "--cache-dir", cache, "--max-batches", "1"]
    two = load_shakespeare(cache_dir=cache).test.client_ids[:2]
    assert main([*argv, "--clients", ",".join(two), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["data"] == "shakespeare" and r["clients"] == 2
    assert 0 < r["predictions"] <= 2 * 8 * 100 and 0 <= r["accuracy"] <= 1
    assert main([*argv, "--clients", "NOBODY"]) == 2
    assert "'NOBODY'" in capsys.readouterr().err
