"""Model checkpoints: a directory holding `model.safetensors` + `config.json`.

    my-model/
      model.safetensors   the CharRNN state_dict (fp32, or fp16/bf16 to ship small files)
      config.json         {"format": "fedtext-checkpoint", "format_version": 1,
                           "model": ModelConfig fields, "vocab": Vocab.record(),
                           "dtype": "float32", "weights_sha256": sha256 of model.safetensors,
                           "provenance": {free dict: corpus, command, steps, seed, ...}}

Saving is atomic (a temp directory beside the target, then a rename), so a crash never leaves a
half-written checkpoint. Loading checks everything it reads and refuses a corrupt, truncated or
mismatched checkpoint with one FedtextError line naming the file, never a library traceback:
a checkpoint is the one file users pass around between machines and versions. The weights'
sha256 in config.json catches flipped bytes that still parse (a checkpoint written by fedtext
0.1 has none and loads unchecked).

Example:
    path = save_checkpoint("runs/ckpt", model, {"steps": 100})
    model, config = load_checkpoint(path)
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save

from fedtext.data.vocab import TUTORIAL, Vocab
from fedtext.errors import FedtextError
from fedtext.model.char_rnn import CharRNN, ModelConfig

FORMAT = "fedtext-checkpoint"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "assets" / "pretrained"


def save_checkpoint(path, model: CharRNN, provenance: dict | None = None,
                    dtype: torch.dtype = torch.float32, vocab: Vocab = TUTORIAL) -> Path:
    """Write `model` as a checkpoint directory, atomically.

    Args:
      path: the checkpoint directory. An existing checkpoint (or empty directory) there is
        replaced; anything else there is refused rather than deleted.
      model: the CharRNN to save.
      provenance: free JSON-able facts (corpus, command, steps, seed, final_loss, ...);
        `fedtext_version` and `created` are filled in unless given.
      dtype: torch.float32, float16 or bfloat16: the storage dtype (loads back as float32).
      vocab: the vocabulary the model's ids mean (its size must be the model's vocab_size).

    Returns:
      The checkpoint directory.
    """
    from fedtext import __version__

    path = Path(path)
    names = {v: k for k, v in DTYPES.items()}
    if dtype not in names:
        raise FedtextError(f"checkpoint dtype must be one of {', '.join(DTYPES)}, not {dtype}")
    if vocab.size != model.config.vocab_size:
        raise FedtextError(f"the vocabulary has {vocab.size} ids but the model has "
                           f"{model.config.vocab_size}")
    if path.exists() and not _replaceable(path):
        raise FedtextError(f"refusing to overwrite {path}: it exists and is not a fedtext "
                           "checkpoint")
    prov = {"fedtext_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"), **(provenance or {})}
    # .contiguous(): safetensors stores raw buffers; clone() detaches from the live model.
    tensors = {k: v.detach().to("cpu", dtype).contiguous().clone()
               for k, v in model.state_dict().items()}
    weights = save(tensors, metadata={"format": "pt"})
    config = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "model": model.config.to_dict(), "vocab": vocab.record(),
              "dtype": names[dtype], "weights_sha256": hashlib.sha256(weights).hexdigest(),
              "provenance": prov}

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    tmp.mkdir()  # not mkdtemp: that makes it 0700, and a checkpoint should be shareable
    try:
        # save() to bytes, then write: save_file() creates the file 0600, not per umask.
        _write_synced(tmp / WEIGHTS_NAME, weights)
        _write_synced(tmp / CONFIG_NAME,
                      (json.dumps(config, indent=1, default=str) + "\n").encode("utf-8"))
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_synced(file: Path, data: bytes) -> None:
    # fsync before the rename, or a power cut could publish the directory with empty files.
    with open(file, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _replaceable(path: Path) -> bool:
    """True for an existing checkpoint dir or an empty dir: what saving may replace."""
    if not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    try:
        cfg = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        return isinstance(cfg, dict) and cfg.get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename the finished `tmp` dir to `path`. POSIX cannot rename over a non-empty directory,
    so an old checkpoint is first moved aside (and restored if the second rename fails):
    at every instant `path` is either the complete old checkpoint, absent, or the complete new
    one, never a mix."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = _sibling(path, "old")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _sibling(path: Path, tag: str) -> Path:
    """A fresh hidden name beside `path` (same filesystem, so renames are atomic)."""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.{tag}"


def _checkpoint_dir(path) -> Path:
    """A checkpoint dir, given it, one of its two files, or a run directory holding one
    (`fedtext pretrain --out DIR` keeps it in DIR/model, `fedtext train --out RUN` in RUN/final)."""
    path = Path(path).expanduser()
    if path.is_file() and path.name in (CONFIG_NAME, WEIGHTS_NAME):
        return path.parent
    if path.is_dir():
        if not (path / CONFIG_NAME).exists():
            for sub in ("final", "model"):
                if (path / sub / CONFIG_NAME).is_file():
                    return path / sub
        return path
    if not path.exists():
        raise FedtextError(f"no such checkpoint: {path}")
    hint = " (for a Keras model, run `fedtext convert-keras` first)" if path.suffix in (
        ".h5", ".hdf5", ".keras") else ""
    raise FedtextError(f"{path} is not a fedtext checkpoint: expected a directory holding "
                       f"{CONFIG_NAME} and {WEIGHTS_NAME}{hint}")


def resolve_model_spec(spec: str) -> Path:
    """Map a --model argument to a checkpoint directory.

    Args:
      spec: "pretrained" for the checkpoint shipped in fedtext/assets/pretrained/, else a
        checkpoint directory or its config.json / model.safetensors file.

    Returns:
      The checkpoint directory (it exists; its contents are checked when loaded).
    """
    if spec == "pretrained":
        if not (PRETRAINED_DIR / CONFIG_NAME).is_file():
            raise FedtextError(f"the shipped pretrained model is not present in this "
                               f"installation (expected it in {PRETRAINED_DIR})")
        return PRETRAINED_DIR
    return _checkpoint_dir(spec)


def read_checkpoint_config(path) -> dict:
    """Read and check a checkpoint's config.json (format, version, model fields, vocabulary).

    Args:
      path: the checkpoint directory, or its config.json / model.safetensors.

    Returns:
      The parsed config.json, as a dict.
    """
    file = _checkpoint_dir(path) / CONFIG_NAME

    def bad(problem: str) -> FedtextError:
        return FedtextError(f"{file}: {problem}")

    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise bad("missing: not a fedtext checkpoint") from None
    except (OSError, UnicodeDecodeError) as e:
        raise bad(f"cannot read: {_one_line(e)}") from None
    except json.JSONDecodeError as e:
        raise bad(f"corrupt (not valid JSON: {_one_line(e)})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise bad(f"not a fedtext checkpoint config (no \"format\": \"{FORMAT}\")")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise bad(f"checkpoint format_version {version!r} is not supported (this fedtext reads "
                  f"version {FORMAT_VERSION}{'; upgrade fedtext' if newer else ''})")
    try:
        vocab = Vocab.from_record(config.get("vocab"))
    except ValueError as e:
        raise bad(f"bad vocabulary ({e})") from None
    if config.get("dtype", "float32") not in DTYPES:
        raise bad(f"unknown dtype {config.get('dtype')!r}")
    model = _model_config(config.get("model"), bad)  # raises on bad fields
    if model.vocab_size != vocab.size:
        raise bad(f"model vocab_size {model.vocab_size} does not match its vocabulary "
                  f"({vocab.size} ids)")
    return config


def checkpoint_vocab(config: dict) -> Vocab:
    """The Vocab of a config.json read by read_checkpoint_config / load_checkpoint."""
    return Vocab.from_record(config["vocab"])


def _model_config(d, bad) -> ModelConfig:
    """config.json's "model" dict -> ModelConfig, with a clear error for any bad field."""
    if not isinstance(d, dict):
        raise bad("\"model\" must be a dict of ModelConfig fields")
    known = {f.name: f for f in fields(ModelConfig)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise bad(f"unknown model field(s) {', '.join(unknown)} (written by a newer fedtext?)")
    defaults = ModelConfig()
    for k, v in d.items():
        want = type(getattr(defaults, k))
        # bool is an int subclass: refuse `"hidden_size": true` explicitly.
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise bad(f"model field {k} must be {want.__name__}, not {v!r}")
    try:
        return ModelConfig(**d)
    except (TypeError, ValueError) as e:
        raise bad(f"bad model config: {e}") from None


def load_checkpoint(path, device="cpu", compute=None) -> tuple[CharRNN, dict]:
    """Load a checkpoint, checking its hash and every tensor against config.json.

    Args:
      path: the checkpoint directory, or its config.json / model.safetensors.
      device: where to put the model.
      compute: the model's char_rnn.Compute (recurrence implementation and precision).

    Returns:
      (model in eval mode, float32, on `device`; the parsed config.json; its vocabulary is
      checkpoint_vocab(config)).
    """
    folder = _checkpoint_dir(path)
    config = read_checkpoint_config(folder)
    file = folder / WEIGHTS_NAME

    def bad(problem: str) -> FedtextError:
        return FedtextError(f"{file}: {problem}")

    if not file.is_file():
        raise bad("missing")
    try:
        data = file.read_bytes()
    except OSError as e:
        raise bad(f"cannot read: {_one_line(e)}") from None
    want = config.get("weights_sha256")
    if want is not None and hashlib.sha256(data).hexdigest() != want:
        raise bad(f"corrupt: its sha256 does not match the one in {CONFIG_NAME} (the file "
                  "was changed or damaged after it was saved)")
    try:
        tensors = load_bytes(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        # Garbage bytes or a cut file: safetensors checks its header against the file size.
        raise bad(f"corrupt or truncated safetensors file ({_one_line(e)})") from None

    kw = {} if compute is None else {"compute": compute}
    model = CharRNN(_model_config(config["model"], bad), init=False, **kw)  # weights next
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        what = "; ".join(s for s in (
            f"missing tensor(s) {', '.join(missing)}" if missing else "",
            f"unexpected tensor(s) {', '.join(extra)}" if extra else "") if s)
        raise bad(f"does not match the architecture in {CONFIG_NAME} ({what})")
    for k, want in expected.items():
        t = tensors[k]
        if tuple(t.shape) != tuple(want.shape):
            raise bad(f"tensor {k} has shape {tuple(t.shape)}, the architecture in "
                      f"{CONFIG_NAME} needs {tuple(want.shape)}")
        if not t.is_floating_point():
            raise bad(f"tensor {k} has dtype {t.dtype}, expected a floating dtype")
        t = tensors[k] = t.float()
        if not torch.isfinite(t).all():
            raise bad(f"tensor {k} holds NaN or infinite values")
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval(), config


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
