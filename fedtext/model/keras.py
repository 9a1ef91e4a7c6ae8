"""Keras <-> fedtext for the tutorial's char-RNN (Embedding -> GRU -> Dense), with h5py only.

Import reads both file formats Keras writes:
  * HDF5 `.h5` (the tutorial's pre-trained model): `model_weights/<layer>/...` datasets named
    `.../kernel:0` etc., listed in each layer group's `weight_names` attribute. Older Keras
    versions use other group names, so weights are matched by layer and by name suffix
    (`embeddings`, `kernel`, `recurrent_kernel`, `bias`), never by full path.
  * Keras v3 `.keras`: a zip of config.json + model.weights.h5, where the weights are unnamed
    and positional: `<layers>/<layer>/vars/0..n` (the GRU's under `<layer>/cell/vars`).

Keras lays a GRU's three gate blocks out as columns [z|r|h]; torch (and our GRU) stacks rows
[r|z|n]. So weight_ih = kernel[:, perm].T with perm = [H:2H, 0:H, 2H:3H], and likewise the
recurrent kernel and biases. The variant comes from the bias shape: (3H,) is reset_after=False
(the TF1-era GRU of the tutorial's pre-trained model: one input-side bias, imported into our
model's reset_after=False path), (2, 3H) is reset_after=True (input and recurrent bias, exactly
torch.nn.GRU). A CuDNNGRU's (6H,) bias is the reset_after=True pair, flattened.

Vocabulary: the Keras model has 86 embedding rows and 86 outputs, the tutorial's characters in
the tutorial's order, which are our ids 0..85. Our models have 88 (PAD=86 and OOV=87
appended). The two extra embedding rows are zero, and the two extra output rows have zero
weights and a bias of -1e4: exp(-1e4) underflows to exactly 0 in float32, so the softmax over
the 86 real characters is unchanged to float precision and PAD/OOV are never predicted.

Export (`export_keras`, `fedtext export-keras RUN OUT.h5`) writes the trained weights back in
the tutorial's Keras HDF5 layout (Keras 2.14's `save_model(..., save_format="h5")`: the same
groups, datasets, shapes and attributes), so they can be loaded into the original Keras model
with `tf.keras.models.load_model` or `model.load_weights`, as the tutorial does. The PAD/OOV
rows of an 88-id model are not part of the Keras model and are left out.

In memory, `keras_to_state_dict` / `state_dict_to_keras` map between the two layouts; the keys
of the Keras side are "embedding.embeddings", "gru.kernel", "gru.recurrent_kernel",
"gru.bias", "dense.kernel", "dense.bias" (Keras shapes; see KERAS_KEYS).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from fedtext.data.vocab import KERAS, TUTORIAL, Vocab
from fedtext.errors import FedtextError
from fedtext.model.char_rnn import CharRNN, ModelConfig
from fedtext.model.checkpoint import save_checkpoint
from fedtext.paths import atomic_path

KERAS_VOCAB = KERAS.size  # 86
KERAS_KEYS = ("embedding.embeddings", "gru.kernel", "gru.recurrent_kernel", "gru.bias",
              "dense.kernel", "dense.bias")
KERAS_VERSION = "2.14.0"  # the Keras whose HDF5 layout export_keras writes
NO_LOGIT = -1e4  # bias of the PAD/OOV outputs: never predicted, softmax over the 86 unchanged
GRU_CLASSES = ("GRU", "CuDNNGRU")
# The weight roles of each layer kind; a .keras file stores them positionally in this order.
ROLES = {"embedding": ("embeddings",), "gru": ("kernel", "recurrent_kernel", "bias"),
         "dense": ("kernel", "bias")}


@dataclass(frozen=True)
class KerasCharRNN:
    """A Keras Embedding -> GRU -> Dense model's weights, in Keras layout (float32)."""

    embeddings: np.ndarray  # (86, E)
    kernel: np.ndarray  # (E, 3H), column blocks [z|r|h]
    recurrent_kernel: np.ndarray  # (H, 3H)
    bias: np.ndarray  # (3H,) for reset_after=False, (2, 3H) for reset_after=True
    dense_kernel: np.ndarray  # (H, 86): (in, out)
    dense_bias: np.ndarray  # (86,)
    file_format: str  # "h5" or "keras"
    keras_version: str | None
    gru_class: str  # "GRU", or "CuDNNGRU" for old GPU-trained files

    @property
    def reset_after(self) -> bool:
        return self.bias.ndim == 2

    def weights(self) -> dict[str, np.ndarray]:
        """The weights by KERAS_KEYS."""
        return dict(zip(KERAS_KEYS, (self.embeddings, self.kernel, self.recurrent_kernel,
                                     self.bias, self.dense_kernel, self.dense_bias)))


def read_keras(path) -> KerasCharRNN:
    """Read and check a Keras char-RNN file.

    Args:
      path: a Keras HDF5 `.h5` file or a Keras v3 `.keras` zip (detected from the content).

    Returns:
      The model's weights; anything but the tutorial architecture raises FedtextError.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic == b"PK\x03\x04":
            with zipfile.ZipFile(path) as z:
                if not {"config.json", "model.weights.h5"} <= set(z.namelist()):
                    raise FedtextError(f"{path}: a zip file but not a Keras v3 .keras model "
                                       "(no config.json + model.weights.h5)")
                config = json.loads(z.read("config.json"))
                meta = json.loads(z.read("metadata.json")) if "metadata.json" in z.namelist() \
                    else {}
                data = z.read("model.weights.h5")
            with h5py.File(io.BytesIO(data), "r") as f:
                layers = _layers_keras_v3(f, path)
            file_format, version = "keras", meta.get("keras_version")
        elif h5py.is_hdf5(path):
            with h5py.File(path, "r") as f:
                config = _json_attr(f.attrs.get("model_config"))
                layers = _layers_h5(f, path)
                version = _str(f.attrs.get("keras_version")) if "keras_version" in f.attrs \
                    else None
            file_format = "h5"
        else:
            raise FedtextError(f"{path}: not a Keras model file (neither HDF5 .h5 nor a "
                               ".keras zip)")
    except FileNotFoundError:
        raise FedtextError(f"no such file: {path}") from None
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as e:
        # h5py / zipfile / json on a damaged or foreign file (JSONDecodeError is a ValueError).
        msg = " ".join(str(e).split())
        raise FedtextError(f"{path}: cannot read as a Keras model ({msg})") from None
    gru_class = _check_config(config, path) if config is not None else "GRU"
    return _assemble(layers, path, file_format, version, gru_class)


def _str(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _json_attr(x):
    return None if x is None else json.loads(_str(x))


def _as_float32(ds, path, where) -> np.ndarray:
    if not np.issubdtype(ds.dtype, np.floating):
        raise FedtextError(f"{path}: weight {where} has dtype {ds.dtype}, expected floats")
    return np.asarray(ds, dtype=np.float32)


def _layers_h5(f: h5py.File, path) -> list[tuple[str, dict[str, np.ndarray]]]:
    """[(layer name, {role: array})] from a legacy HDF5 file, in layer order."""
    g = f["model_weights"] if "model_weights" in f else f  # save_model vs save_weights files
    if "layer_names" not in g.attrs:
        raise FedtextError(f"{path}: an HDF5 file but not a Keras model (no layer_names)")
    layers = []
    for name in map(_str, g.attrs["layer_names"]):
        lg = g[name]
        if "weight_names" in lg.attrs:
            wnames = [_str(w) for w in lg.attrs["weight_names"]]
        else:  # very old files: just take every dataset below the layer group
            wnames = _datasets_below(lg)
        weights = {}
        for w in wnames:
            role = w.split("/")[-1].split(":")[0]  # "gru/gru_cell/kernel:0" -> "kernel"
            if role in weights:
                raise FedtextError(f"{path}: layer {name} has two weights named {role}")
            weights[role] = _as_float32(lg[w], path, f"{name}/{w}")
        if weights:
            layers.append((name, weights))
    return layers


def _datasets_below(g: h5py.Group) -> list[str]:
    names: list[str] = []
    g.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return names


def _layers_keras_v3(f: h5py.File, path) -> list[tuple[str, dict[str, np.ndarray]]]:
    """[(layer path, {role: array})] from a .keras model.weights.h5: unnamed `vars/<i>`."""
    # Keras 2.13/2.14 file the layers under `_layer_checkpoint_dependencies`, Keras 3 under
    # `layers`; anything else (e.g. `optimizer/vars`) is not model weights.
    base = next((f[b] for b in ("_layer_checkpoint_dependencies", "layers") if b in f), None)
    if base is None:
        raise FedtextError(f"{path}: model.weights.h5 holds no layer weights")
    found = []
    base.visititems(lambda n, o: found.append((n, o)) if (
        isinstance(o, h5py.Group) and n.split("/")[-1] == "vars" and len(o)) else None)
    layers = []
    for name, vars_ in found:
        name = name[: -len("/vars")]  # "gru/cell/vars" -> "gru/cell"
        arrays = list(vars_.values())
        if not all(isinstance(a, h5py.Dataset) for a in arrays):
            raise FedtextError(f"{path}: {name}/vars holds groups, not weights")
        if not any(np.issubdtype(a.dtype, np.floating) for a in arrays):
            continue  # integer state such as a Keras 3 RNG seed_generator: not a weight
        n = len(arrays)
        kind = {1: "embedding", 2: "dense", 3: "gru"}.get(n)
        if kind is None or set(vars_) != {str(i) for i in range(n)}:
            raise FedtextError(f"{path}: layer {name} holds {n} weights; the tutorial "
                               "architecture is Embedding -> GRU -> Dense")
        layers.append((name, {role: _as_float32(vars_[str(i)], path, f"{name}/vars/{i}")
                              for i, role in enumerate(ROLES[kind])}))
    return layers


def _check_config(config: dict, path) -> str:
    """Check the model config's layers are the tutorial's; returns the GRU's class name."""
    inner = config.get("config", config) if isinstance(config, dict) else config
    # Keras >= 2.2 writes {"layers": [...]}; Keras 2.0/2.1 Sequential wrote the bare list.
    layers = inner.get("layers") if isinstance(inner, dict) else inner
    if not isinstance(layers, list):
        raise FedtextError(f"{path}: cannot find the layer list in the model config")
    layers = [lay for lay in layers if lay.get("class_name") != "InputLayer"]
    classes = [lay.get("class_name") for lay in layers]
    arch = " -> ".join(map(str, classes))
    if any(c in ("LSTM", "CuDNNLSTM") for c in classes):
        raise FedtextError(f"{path}: an LSTM model ({arch}); only Keras GRU models are "
                           "supported")
    if len(classes) != 3 or classes[0] != "Embedding" or classes[1] not in GRU_CLASSES \
            or classes[2] != "Dense":
        raise FedtextError(f"{path}: the model is {arch}; only the tutorial architecture "
                           "Embedding -> GRU -> Dense is supported")
    emb, gru, dense = (lay.get("config", {}) for lay in layers)
    problems = []
    if emb.get("mask_zero"):
        problems.append("Embedding(mask_zero=True)")  # would skip steps on id 0 ('d')
    if classes[1] == "GRU":  # CuDNNGRU is fixed to tanh / sigmoid
        for key, want in (("activation", "tanh"), ("recurrent_activation", "sigmoid")):
            got = _activation(gru.get(key, want))
            if got != want:
                problems.append(f"GRU({key}={got!r})")
    if gru.get("go_backwards"):
        problems.append("GRU(go_backwards=True)")
    if _activation(dense.get("activation", "linear")) != "linear":
        problems.append(f"Dense(activation={_activation(dense.get('activation'))!r})")
    if problems:
        raise FedtextError(f"{path}: unsupported layer options: {', '.join(problems)}")
    return classes[1]


def _activation(a) -> str:
    # Keras 3 may serialize an activation as {"class_name": ..., "config": {"name": ...}}.
    if isinstance(a, dict):
        return str(a.get("config", {}).get("name") or a.get("class_name"))
    return str(a)


def _assemble(layers, path, file_format, version, gru_class) -> KerasCharRNN:
    """Pick the three layers by their weight roles and check every shape."""
    kinds = {tuple(sorted(r)): k for k, r in ROLES.items()}
    by_kind: dict[str, list] = {"embedding": [], "gru": [], "dense": []}
    for name, w in layers:
        kind = kinds.get(tuple(sorted(w)))
        if kind is None:
            raise FedtextError(f"{path}: layer {name} has weights {', '.join(w)}; not part of "
                               "the tutorial architecture Embedding -> GRU -> Dense")
        by_kind[kind].append((name, w))
    if any(len(v) != 1 for v in by_kind.values()):
        found = ", ".join(f"{len(v)} {k}" for k, v in by_kind.items())
        raise FedtextError(f"{path}: expected one Embedding, one GRU and one Dense layer "
                           f"with weights, found {found}")
    emb = by_kind["embedding"][0][1]["embeddings"]
    gru, dense = by_kind["gru"][0][1], by_kind["dense"][0][1]
    k, rk, b = gru["kernel"], gru["recurrent_kernel"], gru["bias"]
    dk, db = dense["kernel"], dense["bias"]

    def bad(what: str) -> FedtextError:
        return FedtextError(f"{path}: {what}")

    if emb.ndim != 2 or emb.shape[0] != KERAS_VOCAB:
        raise bad(f"embedding shape {emb.shape}: the tutorial vocabulary has {KERAS_VOCAB} "
                  "characters")
    E = emb.shape[1]
    if rk.ndim != 2:
        raise bad(f"recurrent kernel shape {rk.shape} is not 2-D")
    H = rk.shape[0]
    if rk.shape[1] == 4 * H:
        raise bad(f"recurrent kernel shape {rk.shape} has 4 gates: an LSTM; only GRU models "
                  "are supported")
    if rk.shape != (H, 3 * H):
        raise bad(f"recurrent kernel shape {rk.shape} is not a GRU's (H, 3H)")
    if k.shape != (E, 3 * H):
        raise bad(f"GRU kernel shape {k.shape}, expected {(E, 3 * H)}")
    if b.shape == (6 * H,):  # CuDNNGRU: input and recurrent bias concatenated
        b = b.reshape(2, 3 * H)
    if b.shape not in ((3 * H,), (2, 3 * H)):
        raise bad(f"GRU bias shape {b.shape}, expected {(3 * H,)} (reset_after=False) or "
                  f"{(2, 3 * H)} (reset_after=True)")
    if dk.shape != (H, KERAS_VOCAB) or db.shape != (KERAS_VOCAB,):
        raise bad(f"Dense shapes {dk.shape} + {db.shape}, expected {(H, KERAS_VOCAB)} + "
                  f"{(KERAS_VOCAB,)}: one output per character of the tutorial vocabulary")
    for name, a in (("embedding", emb), ("GRU", k), ("GRU", rk), ("GRU", b), ("Dense", dk),
                    ("Dense", db)):
        if not np.isfinite(a).all():
            raise bad(f"the {name} weights hold NaN or infinite values")
    return KerasCharRNN(emb, k, rk, b, dk, db, file_format, version, gru_class)


def _perm(H: int) -> np.ndarray:
    return np.r_[H:2 * H, 0:H, 2 * H:3 * H]  # Keras [z|r|h] -> torch [r|z|n]


def keras_to_state_dict(w: dict[str, np.ndarray], vocab_size: int = KERAS_VOCAB
                        ) -> dict[str, torch.Tensor]:
    """Keras-layout weights (KERAS_KEYS) -> a CharRNN state_dict, float32.

    Args:
        w: the Keras weights; `gru.bias` (3H,) is reset_after=False, (2, 3H) reset_after=True.
        vocab_size: rows of our model; beyond the Keras model's (PAD, OOV) the embedding rows
            and head weights are zero and the head bias is -1e4 (never predicted).
    """
    emb, k, rk, b = w["embedding.embeddings"], w["gru.kernel"], w["gru.recurrent_kernel"], \
        w["gru.bias"]
    V0, E = emb.shape
    H = rk.shape[0]
    if vocab_size < V0:
        raise ValueError(f"vocab_size {vocab_size} < the Keras model's {V0} characters")
    perm = _perm(H)
    emb_full = np.zeros((vocab_size, E), np.float32)
    emb_full[:V0] = emb
    head_w = np.zeros((vocab_size, H), np.float32)
    head_w[:V0] = w["dense.kernel"].T  # Keras (in, out) -> Linear (out, in)
    head_b = np.full(vocab_size, NO_LOGIT, np.float32)
    head_b[:V0] = w["dense.bias"]
    sd = {"embedding.weight": emb_full,
          "rnn.weight_ih_l0": k[:, perm].T,  # (3H, E)
          "rnn.weight_hh_l0": rk[:, perm].T,  # (3H, H)
          "head.weight": head_w, "head.bias": head_b}
    if b.ndim == 2:
        sd["rnn.bias_ih_l0"], sd["rnn.bias_hh_l0"] = b[0][perm], b[1][perm]
    else:
        sd["rnn.bias_ih_l0"] = b[perm]  # the one input-side bias; no recurrent bias
    return {n: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for n, v in sd.items()}


def state_dict_to_keras(sd: dict[str, torch.Tensor], keras_vocab: int = KERAS_VOCAB
                        ) -> dict[str, np.ndarray]:
    """A one-layer GRU CharRNN state_dict -> Keras-layout weights (KERAS_KEYS), float32.

    Only the first `keras_vocab` ids (the tutorial's characters) are kept: the inverse of
    keras_to_state_dict, bit for bit, on those rows.
    """
    n = {k: v.detach().to("cpu", torch.float32).numpy() for k, v in sd.items()}
    extra = sorted(set(n) - {"embedding.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0",
                             "rnn.bias_ih_l0", "rnn.bias_hh_l0", "head.weight", "head.bias"})
    if extra:
        raise FedtextError(f"only one-layer GRU models export to Keras (found {extra[0]})")
    H = n["rnn.weight_hh_l0"].shape[1]
    inv = np.argsort(_perm(H))  # torch [r|z|n] -> Keras [z|r|h]
    if "rnn.bias_hh_l0" in n:
        bias = np.stack([n["rnn.bias_ih_l0"][inv], n["rnn.bias_hh_l0"][inv]])
    else:
        bias = n["rnn.bias_ih_l0"][inv]
    out = {"embedding.embeddings": n["embedding.weight"][:keras_vocab],
           "gru.kernel": n["rnn.weight_ih_l0"].T[:, inv],
           "gru.recurrent_kernel": n["rnn.weight_hh_l0"].T[:, inv],
           "gru.bias": bias,
           "dense.kernel": n["head.weight"][:keras_vocab].T,
           "dense.bias": n["head.bias"][:keras_vocab]}
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def keras_to_model(w: KerasCharRNN, vocab: Vocab = TUTORIAL) -> CharRNN:
    """Our CharRNN (by default the 88-id tutorial vocabulary, same GRU variant) holding the
    Keras weights, float32, in eval mode."""
    _check_keras_vocab(vocab)
    E, H = w.embeddings.shape[1], w.recurrent_kernel.shape[0]
    config = ModelConfig(vocab_size=vocab.size, embed_dim=E, hidden_size=H, num_layers=1,
                         cell="gru", reset_after=w.reset_after)
    model = CharRNN(config, init=False)
    model.load_state_dict(keras_to_state_dict(w.weights(), vocab.size), strict=True)
    return model.eval()


def _check_keras_vocab(vocab: Vocab) -> None:
    if vocab.chars != KERAS.chars or vocab.first_id != 0:
        raise FedtextError("Keras import/export needs the tutorial's vocabulary: its 86 "
                           "characters as ids 0..85 (this model's vocabulary differs)")


def load_keras_model(path) -> tuple[CharRNN, dict]:
    """Import a Keras char-RNN file.

    Args:
      path: the `.h5` or `.keras` file.

    Returns:
      (our CharRNN with its weights, a provenance dict naming the source and its sha256).
    """
    path = Path(path)
    w = read_keras(path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    variant = f"{w.gru_class}(reset_after={w.reset_after})"
    provenance = {
        "converted_from": "keras",
        "description": f"converted from Keras ({variant}, .{w.file_format} file)",
        "source": str(path.resolve()),
        "source_sha256": sha,
        "keras_format": w.file_format,
        "keras_variant": variant,
        "keras_version": w.keras_version,
    }
    return keras_to_model(w), provenance


def convert_keras(src, out, force: bool = False, dtype: torch.dtype = torch.float32,
                  command: str | None = None) -> Path:
    """Import a Keras char-RNN file and save it as a fedtext checkpoint.

    Args:
      src: the `.h5` or `.keras` file.
      out: the checkpoint directory to write.
      force: replace `out` if it already holds a checkpoint.
      dtype: storage dtype of the checkpoint (torch.float32, float16 or bfloat16).
      command: the command line, recorded in the provenance.

    Returns:
      The checkpoint directory.
    """
    out = Path(out)
    if out.exists() and not force:
        raise FedtextError(f"{out} already exists (use --force to replace it)")
    model, provenance = load_keras_model(src)
    if command:
        provenance["command"] = command
    return save_checkpoint(out, model, provenance, dtype=dtype)


# ----------------------------------------------------------------------------- export


def keras_model_config(embed_dim: int, hidden_size: int, reset_after: bool,
                       batch_size: int | None = 1, stateful: bool = True) -> dict:
    """The Keras 2.14 Sequential config of the tutorial's model (its generation variant:
    batch 1, stateful), as save_model writes it into the HDF5 file's `model_config`."""
    def init(name, config=None):
        return {"module": "keras.initializers", "class_name": name,
                "config": config if config is not None else {"seed": None},
                "registered_name": None}

    shape = [batch_size, None]
    return {"class_name": "Sequential", "config": {"name": "char_rnn", "layers": [
        {"class_name": "InputLayer", "config": {
            "batch_input_shape": shape, "dtype": "float32", "sparse": False, "ragged": False,
            "name": "embedding_input"}},
        {"class_name": "Embedding", "config": {
            "name": "embedding", "trainable": True, "dtype": "float32",
            "batch_input_shape": shape, "input_dim": KERAS_VOCAB, "output_dim": embed_dim,
            "embeddings_initializer": init("RandomUniform", {"minval": -0.05, "maxval": 0.05,
                                                             "seed": None}),
            "embeddings_regularizer": None, "activity_regularizer": None,
            "embeddings_constraint": None, "mask_zero": False, "input_length": None}},
        {"class_name": "GRU", "config": {
            "name": "gru", "trainable": True, "dtype": "float32", "return_sequences": True,
            "return_state": False, "go_backwards": False, "stateful": stateful,
            "unroll": False, "time_major": False, "units": hidden_size, "activation": "tanh",
            "recurrent_activation": "sigmoid", "use_bias": True,
            "kernel_initializer": init("GlorotUniform"),
            "recurrent_initializer": init("GlorotUniform"),
            "bias_initializer": init("Zeros", {}), "kernel_regularizer": None,
            "recurrent_regularizer": None, "bias_regularizer": None,
            "activity_regularizer": None, "kernel_constraint": None,
            "recurrent_constraint": None, "bias_constraint": None, "dropout": 0.0,
            "recurrent_dropout": 0.0, "implementation": 2, "reset_after": reset_after}},
        {"class_name": "Dense", "config": {
            "name": "dense", "trainable": True, "dtype": "float32", "units": KERAS_VOCAB,
            "activation": "linear", "use_bias": True,
            "kernel_initializer": init("GlorotUniform"), "bias_initializer": init("Zeros", {}),
            "kernel_regularizer": None, "bias_regularizer": None,
            "activity_regularizer": None, "kernel_constraint": None, "bias_constraint": None}},
    ]}}


# Keras' HDF5 weight layout: layer -> (dataset path under model_weights/<layer>, weight key).
_H5_LAYOUT = {
    "embedding": [("embedding/embeddings:0", "embedding.embeddings")],
    "gru": [("gru/gru_cell/kernel:0", "gru.kernel"),
            ("gru/gru_cell/recurrent_kernel:0", "gru.recurrent_kernel"),
            ("gru/gru_cell/bias:0", "gru.bias")],
    "dense": [("dense/kernel:0", "dense.kernel"), ("dense/bias:0", "dense.bias")],
}


def export_keras(model: CharRNN, path, vocab: Vocab = TUTORIAL) -> Path:
    """Write `model` as the tutorial's Keras HDF5 file (atomically).

    Args:
        model: a one-layer GRU CharRNN (either reset_after variant) over the tutorial's
            characters (vocabulary TUTORIAL or KERAS).
        path: the .h5 file to write.
        vocab: the model's vocabulary; ids beyond the 86 characters (PAD, OOV) are dropped.

    Returns:
        The path written.
    """
    c = model.config
    if c.cell != "gru" or c.num_layers != 1:
        raise FedtextError(f"only one-layer GRU models export to the tutorial's Keras model "
                           f"(this one: {c.num_layers} x {c.cell.upper()})")
    _check_keras_vocab(vocab)
    weights = state_dict_to_keras(model.state_dict())
    config = json.dumps(keras_model_config(c.embed_dim, c.hidden_size, c.reset_after))
    ascii_ = h5py.string_dtype("ascii")
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["backend"] = "tensorflow"  # variable-length UTF-8, as Keras writes them
            f.attrs["keras_version"] = KERAS_VERSION
            f.attrs.create("model_config", config, dtype=ascii_)
            g = f.create_group("model_weights")
            g.attrs.create("backend", "tensorflow", dtype=ascii_)
            g.attrs.create("keras_version", KERAS_VERSION, dtype=ascii_)
            g.attrs.create("layer_names", list(_H5_LAYOUT), dtype=ascii_)
            for layer, items in _H5_LAYOUT.items():
                lg = g.create_group(layer)
                lg.attrs.create("weight_names", [name for name, _ in items], dtype=ascii_)
                for name, key in items:
                    lg.create_dataset(name, data=weights[key])  # e.g. dense/bias:0
            top = g.create_group("top_level_model_weights")
            top.attrs["weight_names"] = np.zeros(0, dtype=np.float64)
    return path
