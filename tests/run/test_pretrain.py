"""Central pre-training: corpus loading, the schedule, batches, and exact resume."""

import json

import numpy as np
import pytest
import torch

from fedtext.data.vocab import OOV_ID, STOI, decode, encode
from fedtext.errors import FedtextError
from fedtext.model.char_rnn import ModelConfig
from fedtext.pretrain import (
    METRICS_FILE,
    MODEL_DIR,
    STATE_FILE,
    Corpus,
    PretrainConfig,
    learning_rate,
    load_corpus,
    load_train_state,
    pretrain,
    sample_batch,
    split_corpus,
)

TINY = ModelConfig(embed_dim=8, hidden_size=16)
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, "
        "it was the age of foolishness.\n") * 40


def tiny_corpus() -> Corpus:
    return Corpus(ids=encode(TEXT), sources=("dickens.txt",), oov={})


def tiny_cfg(**kw) -> PretrainConfig:
    return PretrainConfig(**{"steps": 6, "batch_size": 4, "seq_len": 12, "warmup_steps": 2,
                             "eval_every": 2, "ckpt_every": 2, "val_frac": 0.05, **kw})


def run(out, cfg, **kw):
    return pretrain(out, cfg, TINY, tiny_corpus(), progress=False, log=lambda *_: None, **kw)


# ----------------------------------------------------------------------------- corpus


def test_kjv_is_clean_prose():
    c = load_corpus(["kjv"])
    assert len(c.ids) > 4_000_000 and c.sources == ("kjv",)
    assert c.oov == {}  # typographic chars were mapped to ASCII; reported as an empty count
    assert STOI["["] not in c.ids and STOI["]"] not in c.ids  # the translators' brackets
    head = decode(c.ids[:60])
    assert head.startswith("In the beginning God created the heaven and the earth.")
    assert "darkness was upon the face of the deep" in decode(c.ids[:300])


def test_user_files_concatenate_and_count_oov(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.txt").write_text("w\u00f6rld \u00f6\n", encoding="utf-8")
    c = load_corpus([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])
    assert c.oov == {"\u00f6": 2}
    assert decode(c.ids) == "hello\nw\ufffdrld \ufffd\n"  # a line break joins the files
    assert (c.ids == OOV_ID).sum() == 2


@pytest.mark.parametrize("case", ["missing", "binary", "directory", "empty", "mixed"])
def test_bad_corpus_files_name_the_problem(tmp_path, case):
    f = tmp_path / "x.txt"
    sources = [str(f)]
    if case == "binary":
        f.write_bytes(b"ok\xff\xfe\x00")
    elif case == "directory":
        f.mkdir()
    elif case == "empty":
        f.write_text("")
    elif case == "mixed":
        f.write_text("text")
        sources = ["kjv", str(f)]
    with pytest.raises(FedtextError) as e:
        load_corpus(sources)
    assert ("x.txt" in str(e.value)) or case == "mixed"
    assert "kjv" in str(e.value) or case != "mixed"


def test_corpus_too_short_for_windows():
    with pytest.raises(FedtextError, match="too short"):
        split_corpus(encode("short text"), 0.01, seq_len=100)


# ----------------------------------------------------------------------------- pieces


def test_split_holds_out_the_tail():
    ids = np.arange(1000, dtype=np.uint8) % 86
    train, val = split_corpus(ids, 0.02, seq_len=10)
    assert len(val) == 20 and np.array_equal(np.concatenate([train, val]), ids)
    train, val = split_corpus(ids, 0.001, seq_len=10)
    assert len(val) == 11  # at least one full window


def test_sample_batch_targets_are_the_next_chars():
    ids = (np.arange(500) % 86).astype(np.uint8)  # each id is its predecessor + 1 (mod 86)
    x, y, mask = sample_batch(ids, 16, 20, np.random.default_rng(0))
    assert x.shape == y.shape == mask.shape == (16, 20) and mask.all()
    assert torch.equal(y, (x + 1) % 86)
    assert torch.equal(x[:, 1:], y[:, :-1])
    # every window lies inside the stream, the last char included
    x, y, _ = sample_batch(ids[:22], 64, 20, np.random.default_rng(1))
    assert set(x[:, 0].tolist()) <= {0, 1}


def test_learning_rate_schedule():
    cfg = PretrainConfig(steps=100, lr=1e-2, min_lr=1e-3, warmup_steps=10)
    lrs = [learning_rate(s, cfg) for s in range(100)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warmup rises
    assert lrs[10] == pytest.approx(1e-2)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then decays
    assert learning_rate(100, cfg) == pytest.approx(1e-3)
    mid = learning_rate(55, PretrainConfig(steps=100, lr=1e-2, min_lr=0, warmup_steps=10,
                                           lr_decay="linear"))
    assert mid == pytest.approx(0.5e-2)
    assert learning_rate(99, PretrainConfig(steps=100, lr_decay="none", warmup_steps=0)) == 2e-3


# ----------------------------------------------------------------------------- training


def test_training_lowers_loss_and_writes_everything(tmp_path):
    row = run(tmp_path / "r", tiny_cfg(steps=30, lr=1e-2, eval_every=10, ckpt_every=30))
    rows = [json.loads(r) for r in (tmp_path / "r" / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert {"val_loss", "val_accuracy", "chars_per_s", "lr"} <= set(rows[0])
    assert row == rows[-1]
    cfg = json.loads((tmp_path / "r" / MODEL_DIR / "config.json").read_text())
    prov = cfg["provenance"]
    assert prov["steps"] == 30 and prov["corpus"] == "dickens.txt"
    assert prov["val_loss"] == pytest.approx(rows[-1]["val_loss"])


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    cfg = tiny_cfg(steps=6, ckpt_every=3)
    run(tmp_path / "once", cfg)
    run(tmp_path / "twice", cfg, until_step=3)
    assert load_train_state(tmp_path / "twice" / STATE_FILE)["step"] == 3
    run(tmp_path / "twice", cfg, resume=True)
    a = load_train_state(tmp_path / "once" / STATE_FILE)
    b = load_train_state(tmp_path / "twice" / STATE_FILE)
    assert a["step"] == b["step"] == 6
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in s:
            assert torch.equal(s[k], t[k])
    assert a["numpy_rng"] == b["numpy_rng"]
    assert torch.equal(a["torch_rng"], b["torch_rng"])
    # ...and a model trained differently is not equal: the comparison can fail.
    run(tmp_path / "other", tiny_cfg(steps=6, seed=1))
    c = load_train_state(tmp_path / "other" / STATE_FILE)
    assert not torch.equal(a["model"]["head.weight"], c["model"]["head.weight"])


def test_resume_between_two_metrics_rows_writes_the_same_rows(tmp_path):
    # Checkpoint every 3 steps, a metrics row every 4: resuming at step 3 must carry the
    # running sums of steps 1-3 into the step-4 row, as an uninterrupted run does.
    cfg = tiny_cfg(steps=8, ckpt_every=3, eval_every=4)
    run(tmp_path / "once", cfg)
    run(tmp_path / "twice", cfg, until_step=3)
    run(tmp_path / "twice", cfg, resume=True)
    a = [json.loads(r) for r in (tmp_path / "once" / METRICS_FILE).read_text().splitlines()]
    b = [json.loads(r) for r in (tmp_path / "twice" / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [4, 8]
    for x, y in zip(a, b):
        assert (x["train_loss"], x["val_loss"], x["lr"]) == (y["train_loss"], y["val_loss"],
                                                              y["lr"])


def test_a_half_written_metrics_line_does_not_break_resume(tmp_path):
    out, cfg = tmp_path / "r", tiny_cfg(steps=4, ckpt_every=2, eval_every=1)
    run(out, cfg, until_step=2)
    with (out / METRICS_FILE).open("a") as f:
        f.write('{"step": 3, "train_lo')  # killed while writing
    run(out, cfg, resume=True)
    rows = [json.loads(r) for r in (out / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_resume_after_a_crash_relogs_lost_steps(tmp_path):
    out, cfg = tmp_path / "r", tiny_cfg(steps=6, ckpt_every=4, eval_every=1)
    run(out, cfg, until_step=4)
    assert load_train_state(out / STATE_FILE)["step"] == 4
    # A crash after logging steps 5 and 6 but before their checkpoint leaves these rows behind.
    with (out / METRICS_FILE).open("a") as f:
        f.write(json.dumps({"step": 5, "stale": True}) + "\n")
        f.write(json.dumps({"step": 6, "stale": True}) + "\n")
    run(out, cfg, resume=True)
    rows = [json.loads(r) for r in (out / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert not any("stale" in r for r in rows)


def test_resume_refuses_other_settings(tmp_path):
    out = tmp_path / "r"
    run(out, tiny_cfg(steps=2))
    with pytest.raises(FedtextError, match="already holds a training run"):
        run(out, tiny_cfg(steps=2))
    with pytest.raises(FedtextError, match="batch_size=4"):
        run(out, tiny_cfg(steps=4, batch_size=8), resume=True)
    with pytest.raises(FedtextError, match="hidden_size=16"):
        pretrain(out, tiny_cfg(steps=4), ModelConfig(embed_dim=8, hidden_size=32),
                 tiny_corpus(), resume=True, progress=False, log=lambda *_: None)
    other = Corpus(ids=encode(TEXT.upper()), sources=("dickens.txt",), oov={})
    with pytest.raises(FedtextError, match="corpus"):
        pretrain(out, tiny_cfg(steps=4), TINY, other, resume=True, progress=False,
                 log=lambda *_: None)
    with pytest.raises(FedtextError, match="holds no training run .train_state.pt missing."):
        run(tmp_path / "empty", tiny_cfg(), resume=True)
    notes = []
    pretrain(out, tiny_cfg(steps=4), TINY, tiny_corpus(), resume=True, progress=False,
             log=notes.append)  # more steps is fine, with a note on the stretched schedule
    assert any("--steps changed from 2 to 4" in n for n in notes)
    assert load_train_state(out / STATE_FILE)["step"] == 4


def test_bad_config_is_a_user_error():
    with pytest.raises(FedtextError, match="--steps"):
        PretrainConfig(steps=0)
    with pytest.raises(FedtextError, match="--lr-decay"):
        PretrainConfig(lr_decay="step")
