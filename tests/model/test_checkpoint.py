"""Checkpoints: round trips, atomic overwrite, and refusal of corrupt or mismatched files."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedtext.errors import FedtextError
from fedtext.model import checkpoint
from fedtext.model.char_rnn import CharRNN, ModelConfig
from fedtext.model.checkpoint import (
    load_checkpoint,
    read_checkpoint_config,
    resolve_model_spec,
    save_checkpoint,
)


def tiny(**kw) -> CharRNN:
    torch.manual_seed(0)
    return CharRNN(ModelConfig(embed_dim=8, hidden_size=16, **kw)).eval()


def logits(model, seed=1):
    idx = torch.randint(0, 88, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.run(idx)[0]


@pytest.mark.parametrize("kw", [{}, {"reset_after": False}, {"cell": "lstm"},
                                {"num_layers": 2}])
def test_round_trip_fp32_is_exact(tmp_path, kw):
    model = tiny(**kw)
    path = save_checkpoint(tmp_path / "ckpt", model, {"steps": 3, "seed": 0})
    loaded, config = load_checkpoint(path)
    assert not loaded.training
    assert loaded.config == model.config
    assert config["provenance"]["steps"] == 3 and "created" in config["provenance"]
    assert config["dtype"] == "float32"
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 5e-3), (torch.bfloat16, 5e-2)])
def test_round_trip_half_precision_loads_as_fp32(tmp_path, dtype, atol):
    model = tiny()
    path = save_checkpoint(tmp_path / "ckpt", model, dtype=dtype)
    stored = load_file(str(path / "model.safetensors"))
    assert {t.dtype for t in stored.values()} == {dtype}
    loaded, config = load_checkpoint(path / "config.json")  # a file inside works too
    assert config["dtype"] == str(dtype).removeprefix("torch.")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    torch.testing.assert_close(logits(loaded), logits(model), atol=atol, rtol=0)


def test_overwrite_replaces_checkpoint_and_leaves_nothing_behind(tmp_path):
    a, b = tiny(), CharRNN(ModelConfig(embed_dim=4, hidden_size=8))
    save_checkpoint(tmp_path / "ckpt", a)
    save_checkpoint(tmp_path / "ckpt", b)
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == b.config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json",
                                                                      "model.safetensors"]


def test_failed_save_keeps_the_old_checkpoint(tmp_path):
    class Unprintable:
        def __str__(self):
            raise RuntimeError("boom")

    model = tiny()
    save_checkpoint(tmp_path / "ckpt", model)
    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(tmp_path / "ckpt", tiny(reset_after=False), {"x": Unprintable()})
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(logits(loaded), logits(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_refuses_to_replace_other_directories(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FedtextError, match="not a fedtext checkpoint"):
        save_checkpoint(tmp_path / "notes", tiny())
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


@pytest.fixture
def ckpt(tmp_path):
    return save_checkpoint(tmp_path / "ckpt", tiny())


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def refused(path, *fragments):
    with pytest.raises(FedtextError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_corrupt_weights_are_refused(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x8f\x02garbage" * 100)
    refused(ckpt, "model.safetensors", "corrupt")


def test_truncated_weights_are_refused(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    refused(ckpt, "model.safetensors", "truncated")


def test_corrupt_config_is_refused(ckpt):
    (ckpt / "config.json").write_text('{"format": "fedtext-checkpoint", "mod')
    refused(ckpt, "config.json", "not valid JSON")


def test_missing_files_are_refused(ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    refused(ckpt, "model.safetensors", "missing")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "config.json", "missing")
    refused(tmp_path / "nowhere", "no such checkpoint")


def test_other_architecture_is_refused(ckpt):
    edit_config(ckpt, model={"hidden_size": 32})
    refused(ckpt, "model.safetensors", "rnn.weight_ih_l0", "shape")


def test_other_gru_variant_is_refused(ckpt):
    edit_config(ckpt, model={"reset_after": False})
    refused(ckpt, "unexpected tensor", "rnn.bias_hh_l0")


def rewrite(ckpt, tensors):
    """Replace the weights file and its hash, as a tool that knows the format could."""
    save_file(tensors, str(ckpt / "model.safetensors"))
    edit_config(ckpt, weights_sha256=hashlib.sha256(
        (ckpt / "model.safetensors").read_bytes()).hexdigest())


def test_flipped_bytes_are_caught_by_the_hash(ckpt):
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-7] ^= 0x01  # one bit of one weight: still a valid file, wrong numbers
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    refused(ckpt, "model.safetensors", "sha256")
    edit_config(ckpt, weights_sha256=None)  # a checkpoint without a hash (fedtext 0.1) loads
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["weights_sha256"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    load_checkpoint(ckpt)


def test_missing_and_extra_tensors_are_refused(ckpt):
    tensors = load_file(str(ckpt / "model.safetensors"))
    del tensors["head.bias"]
    tensors["head.extra"] = torch.zeros(3)
    rewrite(ckpt, tensors)
    refused(ckpt, "missing tensor(s) head.bias", "unexpected tensor(s) head.extra")


@pytest.mark.parametrize("bad,fragment", [(float("nan"), "NaN"), (float("inf"), "NaN")])
def test_non_finite_weights_are_refused(ckpt, bad, fragment):
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["head.bias"][3] = bad
    rewrite(ckpt, tensors)
    refused(ckpt, "head.bias", fragment)


def test_integer_weights_are_refused(ckpt):
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["head.bias"] = tensors["head.bias"].to(torch.int32)
    rewrite(ckpt, tensors)
    refused(ckpt, "head.bias", "floating dtype")


@pytest.mark.parametrize("changes,fragment", [
    ({"vocab": {"chars": "abc"}}, "vocabulary"),
    ({"format": "something-else"}, "not a fedtext checkpoint"),
    ({"format_version": 2}, "upgrade fedtext"),
    ({"model": {"cell": "rnn"}}, "cell must be"),
    ({"model": {"hidden_size": "big"}}, "hidden_size must be int"),
    ({"model": {"hidden_size": 0}}, "hidden_size must be >= 1"),
    ({"model": {"vocab_size": 90}}, "vocab_size 90"),
    ({"vocab": {"pad_id": 3}}, "bad vocabulary"),
    ({"model": {"dropout": 0.1}}, "unknown model field"),
    ({"dtype": "int8"}, "dtype"),
])
def test_bad_config_is_refused(ckpt, changes, fragment):
    edit_config(ckpt, **changes)
    refused(ckpt, "config.json", fragment)
    with pytest.raises(FedtextError, match="config.json"):
        read_checkpoint_config(ckpt)


def test_read_checkpoint_config(ckpt):
    cfg = read_checkpoint_config(ckpt / "model.safetensors")
    assert cfg["format"] == "fedtext-checkpoint" and cfg["format_version"] == 1
    assert cfg["model"] == tiny().config.to_dict()
    assert cfg["vocab"]["size"] == 88 and len(cfg["vocab"]["chars"]) == 86


def test_resolve_model_spec(ckpt, tmp_path, monkeypatch):
    assert resolve_model_spec(str(ckpt)) == ckpt
    assert resolve_model_spec(str(ckpt / "config.json")) == ckpt
    assert resolve_model_spec(str(ckpt / "model.safetensors")) == ckpt
    with pytest.raises(FedtextError, match="no such checkpoint"):
        resolve_model_spec(str(tmp_path / "nope"))
    (tmp_path / "model.h5").write_bytes(b"x")
    with pytest.raises(FedtextError, match="convert-keras"):
        resolve_model_spec(str(tmp_path / "model.h5"))
    monkeypatch.setattr(checkpoint, "PRETRAINED_DIR", tmp_path / "absent")
    with pytest.raises(FedtextError, match="shipped pretrained model is not present"):
        resolve_model_spec("pretrained")
    monkeypatch.setattr(checkpoint, "PRETRAINED_DIR", ckpt)
    assert resolve_model_spec("pretrained") == ckpt


def test_any_vocabulary_round_trips(tmp_path):
    from fedtext.data.vocab import KERAS, TUTORIAL, Vocab
    from fedtext.model.checkpoint import checkpoint_vocab

    # An 86-id model (the tutorial's own Keras vocabulary): saved and loaded again.
    model = CharRNN(ModelConfig(vocab_size=86, embed_dim=4, hidden_size=8))
    _, config = load_checkpoint(save_checkpoint(tmp_path / "a", model, vocab=KERAS))
    assert checkpoint_vocab(config) == KERAS
    reddi = Vocab(TUTORIAL.chars, first_id=1, pad_id=0, oov_id=87, bos_id=88, eos_id=89)
    model = CharRNN(ModelConfig(vocab_size=90, embed_dim=4, hidden_size=8))
    _, config = load_checkpoint(save_checkpoint(tmp_path / "b", model, vocab=reddi))
    assert checkpoint_vocab(config) == reddi
    with pytest.raises(FedtextError, match="the model has 90"):
        save_checkpoint(tmp_path / "c", model)  # TUTORIAL has 88
