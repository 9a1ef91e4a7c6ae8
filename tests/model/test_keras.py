"""Keras import against the real Keras 2.14 reference files (both GRU variants, .h5 and .keras).

The expected logits and states were computed by Keras itself (see shared/reference/README.md);
our imported model must reproduce them within 1e-5. A swapped gate block or the wrong GRU
variant would be off by 0.1 to 1.
"""

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import REFERENCE

from fedtext.cli.main import main
from fedtext.data.vocab import OOV_ID, PAD_ID
from fedtext.errors import FedtextError
from fedtext.model.checkpoint import load_checkpoint
from fedtext.model.keras import load_keras_model, read_keras

REF = REFERENCE
FALSE_H5 = "keras_char_rnn_small_reset_after_false.h5"
TRUE_H5 = "keras_char_rnn_small_reset_after_true.h5"
KERAS_V3 = "keras_char_rnn_small.keras"
CASES = [(FALSE_H5, "reset_after_false"), (TRUE_H5, "reset_after_true"),
         (KERAS_V3, "reset_after_true")]
ATOL = 1e-5


@pytest.fixture(scope="module")
def ref() -> Path:
    return REF


@pytest.fixture(scope="module")
def expected(ref):
    return dict(np.load(ref / "keras_char_rnn_small_expected.npz"))


def check_against_keras(model, expected, tag) -> float:
    """Run the reference procedure on `model`; assert every output matches; return max diff."""
    prompt = torch.from_numpy(expected["prompt_ids"])[None]  # (1, 39)
    cont = torch.from_numpy(expected["continuation_ids"])[None]  # (1, 200)
    with torch.no_grad():
        lp, h = model.run(prompt)  # from zero state
        lc, h2 = model.run(cont, h)  # state carried over from the prompt
        lz, _ = model.run(cont)  # from zero state again
    got = {"logits_prompt": lp, "state_after_prompt": h[0],  # (L=1, B, H) -> (B, H)
           "logits_continuation_after_prompt": lc, "state_after_continuation": h2[0],
           "logits_continuation_from_zero_state": lz}
    worst = 0.0
    for key, value in got.items():
        value = value.numpy()
        if key.startswith("logits"):
            value = value[..., :86]  # the Keras model's 86 characters; PAD/OOV come after
        want = expected[f"{tag}.{key}"]
        assert value.shape == want.shape, key
        np.testing.assert_allclose(value, want, rtol=0, atol=ATOL, err_msg=f"{tag} {key}")
        worst = max(worst, float(np.abs(value - want).max()))
    return worst


@pytest.mark.parametrize("name,tag", CASES)
def test_import_matches_keras(ref, expected, name, tag):
    model, prov = load_keras_model(ref / name)
    worst = check_against_keras(model, expected, tag)
    assert worst < ATOL
    reset_after = tag == "reset_after_true"
    assert model.config.reset_after is reset_after
    # reset_after=False must run through our reset_after=False GRU, which has no b_hh.
    assert ("rnn.bias_hh_l0" in model.state_dict()) is reset_after
    assert (model.config.embed_dim, model.config.hidden_size, model.config.vocab_size) == (
        16, 64, 88)
    assert prov["keras_variant"] == f"GRU(reset_after={reset_after})"
    assert prov["source_sha256"] == hashlib.sha256((ref / name).read_bytes()).hexdigest()
    assert "converted from Keras" in prov["description"]


@pytest.mark.parametrize("name,tag", CASES)
def test_read_keras_weights_in_keras_layout(ref, expected, name, tag):
    w = read_keras(ref / name)
    assert w.file_format == ("keras" if name.endswith(".keras") else "h5")
    for field, key in [("embeddings", "embedding.embeddings"), ("kernel", "gru.kernel"),
                       ("recurrent_kernel", "gru.recurrent_kernel"), ("bias", "gru.bias"),
                       ("dense_kernel", "dense.kernel"), ("dense_bias", "dense.bias")]:
        np.testing.assert_array_equal(getattr(w, field), expected[f"{tag}.{key}"])


def test_pad_and_oov_are_never_predicted(ref):
    model, _ = load_keras_model(ref / TRUE_H5)
    sd = model.state_dict()
    assert not sd["embedding.weight"][PAD_ID:].any() and not sd["head.weight"][PAD_ID:].any()
    assert (sd["head.bias"][[PAD_ID, OOV_ID]] == -1e4).all()
    with torch.no_grad():
        logits, _ = model.run(torch.arange(86)[None])
    p88 = torch.softmax(logits, -1)
    p86 = torch.softmax(logits[..., :86], -1)
    assert (p88[..., PAD_ID:] == 0).all()
    torch.testing.assert_close(p88[..., :86], p86, atol=1e-7, rtol=0)


# --- files Keras versions other than 2.14 write: built here from the reference arrays ------

def write_legacy_h5(path, arrays, names, config=None, bias=None):
    """A Keras HDF5 file in the older layout: layer groups `<name>/<name>/<weight>:0`."""
    with h5py.File(path, "w") as f:
        g = f.create_group("model_weights")
        if config is not None:
            f.attrs["model_config"] = json.dumps(config)
        g.attrs["layer_names"] = [n.encode() for n in names]  # bytes, as old Keras wrote
        layers = {names[0]: {"embeddings": arrays["embedding.embeddings"]},
                  names[1]: {"kernel": arrays["gru.kernel"],
                             "recurrent_kernel": arrays["gru.recurrent_kernel"],
                             "bias": arrays["gru.bias"] if bias is None else bias},
                  names[2]: {"kernel": arrays["dense.kernel"], "bias": arrays["dense.bias"]}}
        for layer, weights in layers.items():
            wnames = [f"{layer}/{k}:0" for k in weights]
            g.create_group(layer).attrs["weight_names"] = [w.encode() for w in wnames]
            for w, a in zip(wnames, weights.values()):
                g[layer].create_dataset(w, data=a)


def arrays_of(expected, tag):
    return {k.split(".", 1)[1]: v for k, v in expected.items() if k.startswith(tag + ".")}


def test_older_group_names_reset_after_false(tmp_path, expected):
    # The tutorial's pre-trained file predates `gru_cell` scopes: `gru_1/kernel:0` etc.
    path = tmp_path / "old.h5"
    write_legacy_h5(path, arrays_of(expected, "reset_after_false"),
                    ["embedding_1", "gru_1", "dense_1"])
    model, _ = load_keras_model(path)
    assert model.config.reset_after is False
    check_against_keras(model, expected, "reset_after_false")


def test_cudnn_gru_bias_is_the_reset_after_true_pair(tmp_path, expected):
    arrays = arrays_of(expected, "reset_after_true")
    config = {"class_name": "Sequential", "config": [  # Keras 2.0/2.1: a bare layer list
        {"class_name": "Embedding", "config": {}}, {"class_name": "CuDNNGRU", "config": {}},
        {"class_name": "Dense", "config": {"activation": "linear"}}]}
    path = tmp_path / "cudnn.h5"
    write_legacy_h5(path, arrays, ["embedding", "cu_dnngru", "dense"], config,
                    bias=arrays["gru.bias"].reshape(-1))  # (6H,)
    model, prov = load_keras_model(path)
    assert prov["keras_variant"] == "CuDNNGRU(reset_after=True)"
    check_against_keras(model, expected, "reset_after_true")


def test_keras3_layout(ref, tmp_path, expected):
    # Keras 3 files layers under `layers/` (not `_layer_checkpoint_dependencies/`) and may
    # hold integer RNG state and optimizer variables beside the weights: all to be skipped.
    arrays = arrays_of(expected, "reset_after_true")
    weights = tmp_path / "model.weights.h5"
    with h5py.File(weights, "w") as f:
        f["layers/embedding/vars/0"] = arrays["embedding.embeddings"]
        for i, k in enumerate(["kernel", "recurrent_kernel", "bias"]):
            f[f"layers/gru/cell/vars/{i}"] = arrays[f"gru.{k}"]
        f["layers/gru/cell/seed_generator/vars/0"] = np.zeros(2, np.uint32)
        f["layers/dense/vars/0"], f["layers/dense/vars/1"] = arrays["dense.kernel"], arrays[
            "dense.bias"]
        f["optimizer/vars/0"] = np.zeros((), np.int64)
    with zipfile.ZipFile(ref / KERAS_V3) as z:
        config = z.read("config.json")
    path = tmp_path / "k3.keras"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("metadata.json", json.dumps({"keras_version": "3.5.0"}))
        z.writestr("config.json", config)
        z.write(weights, "model.weights.h5")
    model, prov = load_keras_model(path)
    assert prov["keras_version"] == "3.5.0"
    check_against_keras(model, expected, "reset_after_true")


def edited_copy(ref, tmp_path, edit, name=TRUE_H5):
    path = tmp_path / name
    shutil.copy(ref / name, path)
    path.chmod(0o644)
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def edit_model_config(fn):
    def edit(f):
        cfg = json.loads(f.attrs["model_config"])
        fn(cfg["config"]["layers"])
        f.attrs["model_config"] = json.dumps(cfg)
    return edit


def rejected(path, *fragments):
    with pytest.raises(FedtextError) as e:
        read_keras(path)
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg


def test_lstm_is_rejected(ref, tmp_path, expected):
    def to_lstm(layers):
        layers[2]["class_name"] = "LSTM"
    rejected(edited_copy(ref, tmp_path, edit_model_config(to_lstm)), "LSTM")
    # Without a model config, the 4-gate recurrent kernel gives it away.
    arrays = arrays_of(expected, "reset_after_true")
    H = 64
    arrays.update({"gru.kernel": np.zeros((16, 4 * H), np.float32),
                   "gru.recurrent_kernel": np.zeros((H, 4 * H), np.float32)})
    write_legacy_h5(tmp_path / "lstm.h5", arrays, ["embedding", "lstm", "dense"],
                    bias=np.zeros(4 * H, np.float32))
    rejected(tmp_path / "lstm.h5", "LSTM")


def test_extra_layer_is_rejected(ref, tmp_path):
    def add_dense(layers):
        layers.append(dict(layers[-1], config=dict(layers[-1]["config"], name="dense_1")))
    rejected(edited_copy(ref, tmp_path, edit_model_config(add_dense)),
             "Embedding -> GRU -> Dense -> Dense")

    def add_weights(f):  # a second weighted Dense layer, no model config to tell
        del f.attrs["model_config"]
        g = f["model_weights"]
        g.copy("dense", "dense_1")
        names = [n.decode() if isinstance(n, bytes) else n for n in g.attrs["layer_names"]]
        g.attrs["layer_names"] = names + ["dense_1"]
    rejected(edited_copy(ref, tmp_path, add_weights, FALSE_H5), "2 dense")


def test_wrong_vocab_size_is_rejected(ref, tmp_path):
    def grow(f):
        g = f["model_weights/embedding/embedding"]
        del g["embeddings:0"]
        g["embeddings:0"] = np.zeros((90, 16), np.float32)
    rejected(edited_copy(ref, tmp_path, grow), "embedding shape (90, 16)", "86")


def test_unsupported_options_are_rejected(ref, tmp_path):
    def hard_sigmoid(layers):
        layers[2]["config"]["recurrent_activation"] = "hard_sigmoid"
    rejected(edited_copy(ref, tmp_path, edit_model_config(hard_sigmoid)), "hard_sigmoid")


def test_non_keras_files_are_rejected(tmp_path, ref):
    (tmp_path / "notes.txt").write_text("hello")
    rejected(tmp_path / "notes.txt", "not a Keras model file")
    with h5py.File(tmp_path / "data.h5", "w") as f:
        f["x"] = np.zeros(3)
    rejected(tmp_path / "data.h5", "not a Keras model")
    cut = (ref / FALSE_H5).read_bytes()
    (tmp_path / "cut.h5").write_bytes(cut[: len(cut) // 2])
    rejected(tmp_path / "cut.h5", "cut.h5")
    cut = (ref / KERAS_V3).read_bytes()
    (tmp_path / "cut.keras").write_bytes(cut[: len(cut) // 2])
    rejected(tmp_path / "cut.keras", "cut.keras")
    rejected(tmp_path / "missing.h5", "no such file")


# --- the CLI ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,tag", [(FALSE_H5, "reset_after_false"),
                                      (KERAS_V3, "reset_after_true")])
def test_cli_convert_keras_end_to_end(ref, expected, tmp_path, capsys, name, tag):
    out = tmp_path / "converted"
    assert main(["convert-keras", str(ref / name), str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    model, config = load_checkpoint(out)
    check_against_keras(model, expected, tag)
    prov = config["provenance"]
    assert prov["source_sha256"] == hashlib.sha256((ref / name).read_bytes()).hexdigest()
    assert prov["converted_from"] == "keras" and prov["command"].startswith("fedtext ")

    # An existing OUT needs --force.
    assert main(["convert-keras", str(ref / name), str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["convert-keras", str(ref / name), str(out), "--force", "--dtype",
                 "float16"]) == 0
    assert load_checkpoint(out)[1]["dtype"] == "float16"


def test_cli_errors_exit_2_without_traceback(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    for src, fragment in [(tmp_path / "missing.h5", "no such file"),
                          (tmp_path / "notes.txt", "not a Keras model file")]:
        assert main(["convert-keras", str(src), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fedtext: error: ") and fragment in err
        assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


# --- export: our weights back into the tutorial's Keras file ------------------------------


def h5_layout(path) -> dict:
    """Every group/dataset path with its attributes (value, stored type) and dataset shape and
    dtype: what Keras' loader reads."""
    out = {}

    def attrs(obj):
        got = {}
        for name in obj.attrs:
            aid = obj.attrs.get_id(name)
            t = aid.get_type()
            kind = (type(t).__name__, t.is_variable_str(), t.get_cset()) \
                if isinstance(t, h5py.h5t.TypeStringID) else (type(t).__name__,)
            value = obj.attrs[name]
            value = value.tolist() if isinstance(value, np.ndarray) else value
            got[name] = (kind, aid.shape, value)
        return got

    with h5py.File(path, "r") as f:
        out["/"] = attrs(f)
        f.visititems(lambda n, o: out.__setitem__(n, (
            attrs(o), getattr(o, "shape", None), str(getattr(o, "dtype", "")))))
    return out


@pytest.mark.parametrize("name", [FALSE_H5, TRUE_H5])
def test_export_writes_the_reference_files_layout(ref, tmp_path, name):
    from fedtext.model.keras import export_keras

    model, _ = load_keras_model(ref / name)
    out = export_keras(model, tmp_path / "out.h5")
    assert h5_layout(out) == h5_layout(ref / name)  # groups, datasets, shapes, attributes
    with h5py.File(out) as a, h5py.File(ref / name) as b:
        b.visititems(lambda n, o: np.testing.assert_array_equal(a[n][()], o[()])
                     if isinstance(o, h5py.Dataset) else None)  # and every weight, bit for bit
    assert (out.stat().st_mode & 0o777) != 0o600  # an ordinary file, not mkstemp's private one


@pytest.mark.parametrize("reset_after", [True, False])
def test_export_then_import_is_bit_identical(tmp_path, reset_after):
    from fedtext.model.char_rnn import CharRNN, ModelConfig
    from fedtext.model.keras import export_keras, state_dict_to_keras

    torch.manual_seed(0)
    # An 86-id model (the Keras vocabulary) round-trips whole.
    from fedtext.data.vocab import KERAS

    m86 = CharRNN(ModelConfig(vocab_size=86, embed_dim=8, hidden_size=16,
                              reset_after=reset_after))
    back, _ = load_keras_model(export_keras(m86, tmp_path / "a.h5", KERAS))
    w_in, w_back = state_dict_to_keras(m86.state_dict()), state_dict_to_keras(back.state_dict())
    for k in w_in:
        np.testing.assert_array_equal(w_back[k], w_in[k])
    # An 88-id model trained by fedtext: the 86 characters' weights round-trip bit for bit;
    # PAD/OOV are not part of the Keras model (re-imported as zero rows and a -1e4 bias).
    m88 = CharRNN(ModelConfig(embed_dim=8, hidden_size=16, reset_after=reset_after))
    back, _ = load_keras_model(export_keras(m88, tmp_path / "b.h5"))
    a, b = m88.state_dict(), back.state_dict()
    for k in a:
        if k in ("embedding.weight", "head.weight", "head.bias"):
            assert torch.equal(a[k][:86], b[k][:86])
        else:
            assert torch.equal(a[k], b[k]), k


def test_export_refuses_what_keras_cannot_hold(tmp_path):
    from fedtext.model.char_rnn import CharRNN, ModelConfig
    from fedtext.model.keras import export_keras

    with pytest.raises(FedtextError, match="one-layer GRU"):
        export_keras(CharRNN(ModelConfig(embed_dim=4, hidden_size=8, cell="lstm")),
                     tmp_path / "x.h5")
    with pytest.raises(FedtextError, match="one-layer GRU"):
        export_keras(CharRNN(ModelConfig(embed_dim=4, hidden_size=8, num_layers=2)),
                     tmp_path / "x.h5")


def test_cli_export_keras(ref, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["convert-keras", str(ref / FALSE_H5), str(ckpt)]) == 0
    out = tmp_path / "exported.h5"
    assert main(["export-keras", str(ckpt), str(out)]) == 0
    assert "reset_after=False" in capsys.readouterr().out
    assert h5_layout(out) == h5_layout(ref / FALSE_H5)
    assert main(["export-keras", str(ckpt), str(out)]) == 2  # exists: refused without --force
    assert "--force" in capsys.readouterr().err
    assert main(["export-keras", str(ckpt), str(out), "--force"]) == 0
    assert main(["export-keras", str(tmp_path / "nope"), str(out), "--force"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
