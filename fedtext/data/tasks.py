"""Tasks (a vocabulary + the preprocessing that turns a client's text into batches) and the
picklable description of one client's data that every backend ships instead of batches.

    task = TASKS["tutorial"]            # TFF's text-generation tutorial: 88 ids, 8 x 100
    batches = task.batches(store, "KING_LEAR_KENT", DataConfig(), shuffle_seed=0)
    TASKS["reddi2021"]                  # Reddi et al. 2021 / TFF baselines: 90 ids, per-snippet
                                        # [BOS] + chars + [EOS], 4 x 80 (configs/reddi2021/)

    data = ClientData("shakespeare", "KING_LEAR_KENT", config=DataConfig())
    data(epoch, seed)                   # the client's batches for one local epoch

`ClientData` names its data (source, client id, batching settings) and never carries it: a
worker process, a Ray actor or a Flower node opens the (memory-mapped) store itself, once per
process (`open_dataset` caches it), so a job pickles to a few hundred bytes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from fedtext.data import vocab as V
from fedtext.data.batching import Batch, client_batches, snippet_batches
from fedtext.data.store import ClientStore, FederatedDataset, load_dataset
from fedtext.errors import FedtextError
from fedtext.registry import Registry

SHAKESPEARE = "shakespeare"  # DataConfig.source of the built-in federated Shakespeare


@dataclass(frozen=True)
class DataConfig:
    """[data]: where the clients' text comes from and how it becomes batches."""

    source: str = field(default=SHAKESPEARE, metadata={
        "flag": "data", "metavar": "shakespeare|PATH", "help": "'shakespeare' (federated "
        "Shakespeare), or your own data: a directory of <client>.txt files or a .jsonl file"})
    task: str = field(default="tutorial", metadata={
        "help": "vocabulary + preprocessing (fedtext.data.tasks.TASKS): tutorial (TFF's "
        "text generation tutorial), reddi2021 (Reddi et al. 2021's Shakespeare: per-snippet "
        "BOS/EOS, use with batch 4, seq 80, buffer 50)"})
    batch_size: int = field(default=8, metadata={
        "help": "sequences per batch (the tutorial's BATCH_SIZE)"})
    seq_len: int = field(default=100, metadata={
        "help": "characters per sequence (the tutorial's SEQ_LENGTH)"})
    drop_remainder: bool = field(default=False, metadata={
        "off_flag": "padding", "help": "only full batches, as the tutorial (clients under "
        "batch*(seq+1) chars have none); the default pads and masks instead, so small "
        "clients take part"})
    shuffle: bool = field(default=True, metadata={
        "help": "shuffle a client's sequences each epoch (the tutorial's .shuffle)"})
    shuffle_buffer: int = field(default=100, metadata={
        "help": "shuffle buffer, in sequences (the tutorial's BUFFER_SIZE); in snippets for "
        "task reddi2021 (TFF's 50)"})

    def __post_init__(self):
        if not self.source.strip():
            raise FedtextError("source must not be empty")
        TASKS.check(self.task, "task")
        for name in ("batch_size", "seq_len", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise FedtextError(f"{name} must be >= 1, not {getattr(self, name)}")

    @property
    def mode(self) -> str:
        return "drop_remainder" if self.drop_remainder else "padded"

    def min_chars(self) -> int:
        """Characters a client needs for one batch: a full one, or one target when padding."""
        return (self.seq_len + 1) * self.batch_size if self.drop_remainder else 2


@dataclass(frozen=True)
class Task:
    """A vocabulary and the preprocessing of one client's text into batches.

    per_snippet False: the client's snippets are one stream cut into (seq_len + 1)-char
    sequences (the tutorial; batching.client_batches). True: each snippet becomes
    [BOS] + chars + [EOS] padded to a multiple of seq_len + 1, and the shuffle is over
    snippets (TFF's baselines task; batching.snippet_batches); the vocabulary must have
    PAD, BOS and EOS.
    """

    name: str
    vocab: V.Vocab
    description: str
    model_defaults: dict  # ModelConfig fields of a model trained from scratch on this task,
    # plus optionally "lstm_kernel_init": "he_normal" (fedtext.model.spec.load_initial_model)
    per_snippet: bool = False
    # DataConfig fields that fit this task, for commands that batch without a config
    # (`fedtext evaluate`); a training run takes its [data] table.
    data_defaults: dict = field(default_factory=lambda: {"batch_size": 8, "seq_len": 100})

    def batches(self, store: ClientStore, client_id: str, cfg: DataConfig,
                shuffle_seed: int | None = None, max_batches: int | None = None,
                padded: bool | None = None) -> list[Batch]:
        """The client's batches (its text in this task's ids).

        Args:
            store: the split holding the client.
            client_id: which client.
            cfg: batch size, sequence length, drop_remainder, shuffle buffer.
            shuffle_seed: seed of the buffered shuffle; None keeps the text's order.
            max_batches: keep only the first this many batches.
            padded: override cfg.drop_remainder (evaluation always pads: nothing dropped).
        """
        mode = cfg.mode if padded is None else ("padded" if padded else "drop_remainder")
        ids = store.chars(client_id)
        if self.vocab != V.TUTORIAL:  # the store holds TUTORIAL ids
            ids = self.vocab.from_store_table()[ids]
        if self.per_snippet:
            v = self.vocab
            return snippet_batches(ids, store.snippet_lengths(client_id), bos_id=v.bos_id,
                                   eos_id=v.eos_id, pad_id=v.pad_id,
                                   batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                                   shuffle_seed=shuffle_seed, buffer_size=cfg.shuffle_buffer,
                                   max_batches=max_batches,
                                   drop_remainder=mode == "drop_remainder")
        return client_batches(ids, batch_size=cfg.batch_size, seq_len=cfg.seq_len, mode=mode,
                              shuffle_seed=shuffle_seed, buffer_size=cfg.shuffle_buffer,
                              max_batches=max_batches, pad_id=self.vocab.fill_id)


TASKS = Registry("task")
TASKS.register("tutorial", Task(
    "tutorial", V.TUTORIAL,
    "TFF 'Federated Learning for Text Generation': the 86 tutorial characters + PAD + OOV, "
    "one stream per client cut into (seq_len + 1)-char sequences",
    {"embed_dim": 256, "hidden_size": 1024, "num_layers": 1, "cell": "gru"}))
TASKS.register("reddi2021", Task(
    "reddi2021", V.REDDI2021,
    "Reddi et al. 2021 'Adaptive Federated Optimization' Shakespeare (TFF's "
    "tff.simulation.baselines.shakespeare): PAD 0, the 86 characters 1..86, OOV 87, BOS 88, "
    "EOS 89; per snippet [BOS] + chars + [EOS] padded to a multiple of seq_len + 1; the "
    "shuffle buffer over snippets; only PAD is masked",
    # TFF char_prediction_models.create_recurrent_model: Embedding(90, 8) -> LSTM(256,
    # he_normal kernel) -> LSTM(256) -> Dense(90): 820,522 parameters with Keras' one bias.
    {"embed_dim": 8, "hidden_size": 256, "num_layers": 2, "cell": "lstm",
     "lstm_kernel_init": "he_normal"},
    per_snippet=True, data_defaults={"batch_size": 4, "seq_len": 80}))


@functools.lru_cache(maxsize=4)
def open_dataset(source: str, cache_dir: str | None = None) -> FederatedDataset:
    """The dataset of `source`, opened once per process (a worker reuses it for every job)."""
    return load_dataset(None if source == SHAKESPEARE else source, cache_dir=cache_dir)


@dataclass(frozen=True)
class ClientData:
    """One client's data, by name: calling it gives the batches of one local epoch.

    Picklable and small, so a backend sends this, never the batches; the receiving process
    opens `source` itself. The batches depend only on (this value, epoch, seed).
    """

    source: str  # DataConfig.source: "shakespeare" or a path
    client_id: str
    config: DataConfig = DataConfig()
    max_batches: int | None = None  # per epoch; None = all
    split: str = "train"
    cache_dir: str | None = None

    def __call__(self, epoch: int, seed: int) -> list[Batch]:
        ds = open_dataset(self.source, self.cache_dir)
        store = ds.train if self.split == "train" else ds.test
        shuffle_seed = seed + epoch if self.config.shuffle else None
        return TASKS[self.config.task].batches(store, self.client_id, self.config,
                                               shuffle_seed, self.max_batches)

