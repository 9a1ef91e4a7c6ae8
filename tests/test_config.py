"""TrainConfig: defaults, TOML < flags precedence, clear errors naming the file/flag and key."""

import pytest

from fedtext.cli import build_parser
from fedtext.commands.train import config_sources
from fedtext.config import (
    TrainConfig,
    differences,
    load_config,
    load_toml,
    merge,
    save_toml,
)
from fedtext.errors import FedtextError


def flags(*argv):
    """The (where, overrides) sources `fedtext train --out x ARGV` yields."""
    return config_sources(build_parser().parse_args(["train", "--out", "x", *argv]))


def test_defaults_are_the_tutorials():
    c = TrainConfig()
    assert (c.batch_size, c.seq_len, c.client_optimizer, c.client_lr, c.max_batches,
            c.rounds) == (8, 100, "sgd", 0.5, 5, 5)
    assert (c.server_optimizer, c.server_lr, c.clients_per_round) == ("sgd", 1.0, 10)
    assert c.drop_remainder is False  # we pad where the tutorial drops


def test_resolved_fills_optimizer_defaults():
    assert TrainConfig(server_optimizer="sgdm").resolved().server_momentum == 0.9
    assert TrainConfig().resolved().server_momentum == 0.0
    assert TrainConfig(server_optimizer="yogi").resolved().server_eps == 1e-3
    assert TrainConfig(server_optimizer="adam", server_eps=0.01).resolved().server_eps == 0.01


def test_flags_override_toml_override_defaults(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('rounds = 7\nclient_lr = 2\nclients = ["A", "B"]\nshuffle = false\n')
    cfg = merge(TrainConfig(), *flags("--config", str(f), "--rounds", "9", "--drop-remainder"))
    assert cfg.rounds == 9  # flag beats TOML
    assert cfg.client_lr == 2.0 and isinstance(cfg.client_lr, float)  # TOML beats default
    assert cfg.clients == ("A", "B") and cfg.shuffle is False and cfg.drop_remainder is True
    assert cfg.seq_len == 100  # neither: the default
    cfg = merge(TrainConfig(), *flags("--config", str(f), "--clients", "C,D", "--shuffle"))
    assert cfg.clients == ("C", "D") and cfg.shuffle is True


def test_flags_left_out_do_not_override(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("drop_remainder = true\nmax_batches = 0\n")
    cfg = merge(TrainConfig(), *flags("--config", str(f)))
    assert cfg.drop_remainder is True and cfg.max_batches == 0
    assert merge(TrainConfig(), *flags("--config", str(f), "--padding")).drop_remainder is False


def test_train_table_is_accepted(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[train]\nrounds = 3\n")
    assert load_config(f).rounds == 3


@pytest.mark.parametrize("text,match", [
    ("roundz = 3\n", r"c\.toml: unknown key 'roundz' \(did you mean 'rounds'\?\)"),
    ('rounds = "five"\n', r"c\.toml: rounds must be an integer, not 'five'"),
    ("rounds = 2.5\n", r"c\.toml: rounds must be an integer"),
    ("shuffle = 1\n", r"c\.toml: shuffle must be true or false"),
    ("clients = [1, 2]\n", r"c\.toml: clients must be a list of strings"),
    ("rounds = 0\n", r"c\.toml: rounds must be >= 1, not 0"),
    ("client_lr = -0.1\n", r"c\.toml: client_lr must be > 0"),
    ('server_optimizer = "adamw"\n', r"c\.toml: server_optimizer must be one of sgd, sgdm"),
    ("server_b1 = 1.0\n", r"c\.toml: server_b1 must be in \[0, 1\)"),
    ("rounds = 3\nrounds = 4\n", r"c\.toml: not valid TOML"),
    ("rounds 3\n", r"c\.toml: not valid TOML"),
])
def test_toml_errors_name_file_and_key(tmp_path, text, match):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(FedtextError, match=match):
        load_config(f)


def test_flag_errors_name_the_source():
    with pytest.raises(FedtextError, match=r"^--eval-every must be >= 1, not 0"):
        merge(TrainConfig(), *flags("--eval-every", "0"))
    with pytest.raises(FedtextError, match=r"^--rounds must be an integer, not 'abc'"):
        flags("--rounds", "abc")
    with pytest.raises(FedtextError, match=r"^--client-lr must be a number, not '1e'"):
        flags("--client-lr", "1e")
    with pytest.raises(FedtextError, match=r"^--weighting must be one of tokens, examples"):
        merge(TrainConfig(), *flags("--weighting", "chars"))


def test_settings_that_do_not_go_together():
    with pytest.raises(FedtextError, match="hidden_size.*need model = 'scratch'"):
        TrainConfig(hidden_size=16)
    with pytest.raises(FedtextError, match="server_momentum needs"):
        TrainConfig(server_optimizer="adam", server_momentum=0.9)
    with pytest.raises(FedtextError, match="not both"):
        TrainConfig(eval_clients=3, eval_client_ids=("A",))
    with pytest.raises(FedtextError, match="lists a client twice"):
        TrainConfig(clients=("A", "A"))
    # Set across sources, checked once all are in: the TOML's hidden_size and the flag's model.
    cfg = merge(TrainConfig(), ("a.toml", {"hidden_size": 16}), ("cli", {"model": "scratch"}))
    assert cfg.hidden_size == 16


def test_missing_file():
    with pytest.raises(FedtextError, match="no such config file: nope.toml"):
        load_toml("nope.toml")


def test_save_and_load_round_trip(tmp_path):
    cfg = TrainConfig(model="scratch", hidden_size=16, clients=("A", "B"), max_batches=0,
                      server_optimizer="adam", server_lr=0.01).resolved()
    save_toml(cfg, tmp_path / "c.toml", header="made by a test\nsecond line")
    text = (tmp_path / "c.toml").read_text()
    assert text.startswith("# made by a test\n# second line\n")
    assert load_config(tmp_path / "c.toml") == cfg


def test_differences_ignore_resumable_fields():
    a = TrainConfig()
    assert differences(a, TrainConfig(rounds=50, eval_every=5)) == []
    assert differences(a, TrainConfig(client_lr=0.1)) == ["client_lr=0.5 (asked: 0.1)"]
    # -1 means "the optimizer's default", so spelling the default out is no difference.
    assert differences(TrainConfig(server_optimizer="sgdm"),
                       TrainConfig(server_optimizer="sgdm", server_momentum=0.9)) == []


def test_shipped_configs_load():
    from pathlib import Path

    from fedtext.tutorial import TUTORIAL

    root = Path(__file__).resolve().parents[1] / "configs"
    assert load_config(root / "tutorial.toml") == TUTORIAL  # `fedtext tutorial`'s training
    tiny = load_config(root / "tiny.toml")
    assert tiny.model == "scratch" and tiny.hidden_size <= 64
