"""ExperimentConfig: nested TOML tables, flags filling the same dataclasses, defaults < TOML <
flags, fedtext 0.1 flat files, and one-line errors naming the file (or flag) and the key."""

from pathlib import Path

import pytest

from fedtext.cli.flags import config_sources
from fedtext.cli.main import build_parser
from fedtext.config import (
    FLAGS,
    ExperimentConfig,
    conflicts,
    flag_table,
    from_dict,
    load_config,
    load_toml,
    merge,
    save_toml,
    to_dict,
)
from fedtext.errors import FedtextError

ROOT = Path(__file__).resolve().parents[2]


def flags(*argv):
    """The (where, settings) sources `fedtext train --out x ARGV` yields."""
    return config_sources(build_parser().parse_args(["train", "--out", "x", *argv]))


def test_defaults_are_the_tutorials():
    c = ExperimentConfig()
    assert (c.data.batch_size, c.data.seq_len, c.client.optimizer, c.client.lr,
            c.client.max_batches, c.run.rounds) == (8, 100, "sgd", 0.5, 5, 5)
    assert (c.server.optimizer, c.server.lr, c.sampling.clients_per_round) == ("sgd", 1.0, 10)
    assert c.data.drop_remainder is False  # we pad where the tutorial drops
    assert c.model.init == "pretrained" and c.backend.name == "sequential"


def test_every_field_has_one_flag_and_the_0_1_names_are_kept():
    names = {f.name for f in flag_table()}
    old = {"model", "data", "rounds", "clients-per-round", "clients", "sampling", "weighting",
           "local-epochs", "max-batches", "batch-size", "seq-len", "drop-remainder", "shuffle",
           "client-optimizer", "client-lr", "client-momentum", "prox-mu", "server-optimizer",
           "server-lr", "server-momentum", "server-b1", "server-b2", "server-eps", "clip-norm",
           "eval-every", "eval-clients", "eval-client-ids", "seed", "precision", "embed-dim",
           "hidden-size", "num-layers", "cell", "threads"}
    assert old <= names
    assert {"client-lr-schedule", "server-lr-warmup", "aggregator", "backend", "task"} <= names


def test_flags_override_toml_override_defaults(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[run]\nrounds = 7\n[client]\nlr = 2\n[sampling]\nclients = ["A", "B"]\n'
                 "[data]\nshuffle = false\n")
    cfg = merge(ExperimentConfig(), *flags("--config", str(f), "--rounds", "9",
                                           "--drop-remainder"))
    assert cfg.run.rounds == 9  # flag beats TOML
    assert cfg.client.lr == 2.0 and isinstance(cfg.client.lr, float)  # TOML beats default
    assert cfg.sampling.clients == ("A", "B") and cfg.data.shuffle is False
    assert cfg.data.drop_remainder is True
    assert cfg.data.seq_len == 100  # neither: the default
    cfg = merge(ExperimentConfig(), *flags("--config", str(f), "--clients", "C,D", "--shuffle"))
    assert cfg.sampling.clients == ("C", "D") and cfg.data.shuffle is True


def test_optional_settings_and_zero_means_all(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[data]\ndrop_remainder = true\n[client]\nmax_batches = 0\n"
                 "[server]\noptimizer = 'sgdm'\n")
    cfg = merge(ExperimentConfig(), *flags("--config", str(f)))
    assert cfg.data.drop_remainder is True and cfg.client.max_batches is None
    assert cfg.server.momentum is None and cfg.resolved().server.momentum == 0.9
    assert merge(ExperimentConfig(), *flags("--config", str(f), "--padding")
                 ).data.drop_remainder is False
    assert merge(ExperimentConfig(), *flags("--eval-clients", "0")).eval.clients is None


def test_schedules_are_nested_tables_and_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[server.schedule]\nkind = 'cosine'\nwarmup = 3\n")
    cfg = merge(ExperimentConfig(), *flags("--config", str(f), "--client-lr-schedule", "step",
                                           "--client-lr-step-every", "10"))
    assert (cfg.server.schedule.kind, cfg.server.schedule.warmup) == ("cosine", 3)
    assert (cfg.client.schedule.kind, cfg.client.schedule.step_every) == ("step", 10)


def test_flat_files_of_fedtext_0_1_still_load(tmp_path):
    f = tmp_path / "old.toml"
    f.write_text('model = "scratch"\nhidden_size = 16\nrounds = 3\nclient_lr = 1.0\n'
                 "server_momentum = -1.0\nserver_eps = -1.0\nclip_norm = 0.0\nmax_batches = 0\n"
                 "eval_clients = 20\nthreads = 1\n")
    cfg = load_config(f)
    assert (cfg.model.init, cfg.model.hidden_size, cfg.run.rounds, cfg.client.lr) == (
        "scratch", 16, 3, 1.0)
    assert cfg.server.momentum is None and cfg.server.eps is None  # -1: the default
    assert cfg.aggregator.clip_norm is None and cfg.client.max_batches is None
    assert cfg.eval.clients == 20 and cfg.backend.threads == 1
    f.write_text("[train]\nrounds = 3\n")
    assert load_config(f).run.rounds == 3
    f.write_text("rounds = 3\n[client]\nlr = 0.1\n")  # flat keys beside tables: how to convert
    with pytest.raises(FedtextError, match=r"fedtext 0\.1 flat key: write it as rounds under "
                                           r"\[run\]"):
        load_config(f)


@pytest.mark.parametrize("text,match", [
    ("[run]\nroundz = 3\n", r"c\.toml: unknown key 'roundz' in \[run\] \(did you mean "
                            r"'rounds'\?\)"),
    ("[clinet]\nlr = 3\n", r"c\.toml: unknown table \[clinet\] \(did you mean \[client\]\?\)"),
    ("roundz = 3\n", r"c\.toml: unknown key 'roundz' \(did you mean 'rounds'\?\)"),
    ('[run]\nrounds = "five"\n', r"c\.toml: \[run\] rounds must be an integer, not 'five'"),
    ("[run]\nrounds = 2.5\n", r"c\.toml: \[run\] rounds must be an integer"),
    ("[data]\nshuffle = 1\n", r"c\.toml: \[data\] shuffle must be true or false"),
    ("[sampling]\nclients = [1, 2]\n", r"c\.toml: \[sampling\] clients must be a list"),
    ("[run]\nrounds = 0\n", r"c\.toml: \[run\] rounds must be >= 1, not 0"),
    ("[client]\nlr = -0.1\n", r"c\.toml: \[client\] lr must be a finite number > 0"),
    ('[server]\noptimizer = "adamw"\n', r"c\.toml: \[server\] optimizer must be one of sgd"),
    ("[server]\nb1 = 1.0\n", r"c\.toml: \[server\] b1 must be in \[0, 1\)"),
    ("[client]\nlr = inf\n", r"c\.toml: \[client\] lr must be a finite number"),
    ("[run]\nrounds = 3\n[run]\nseed = 4\n", r"c\.toml: not valid TOML"),
    ("rounds 3\n", r"c\.toml: not valid TOML"),
    ("client_lr = -1\n", r"c\.toml: \[client\] lr must be a finite number > 0"),
])
def test_toml_errors_name_file_and_key(tmp_path, text, match):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(FedtextError, match=match):
        load_config(f)


def test_flag_errors_name_the_flag():
    with pytest.raises(FedtextError, match=r"^--eval-every must be >= 0"):
        merge(ExperimentConfig(), *flags("--eval-every", "-1"))
    with pytest.raises(FedtextError, match=r"^--rounds must be an integer, not 'abc'"):
        merge(ExperimentConfig(), *flags("--rounds", "abc"))
    with pytest.raises(FedtextError, match=r"^--client-lr must be a number, not '1e'"):
        merge(ExperimentConfig(), *flags("--client-lr", "1e"))
    with pytest.raises(FedtextError, match=r"^--client-lr must be a finite number, not inf"):
        merge(ExperimentConfig(), *flags("--client-lr", "1e309"))
    with pytest.raises(FedtextError, match=r"^--weighting must be one of tokens, examples"):
        merge(ExperimentConfig(), *flags("--weighting", "chars"))
    with pytest.raises(FedtextError, match=r"^--server-momentum needs optimizer sgd"):
        merge(ExperimentConfig(), *flags("--server-optimizer", "adam",
                                         "--server-momentum", "0.9"))


def test_settings_that_do_not_go_together_are_checked_across_sources():
    with pytest.raises(FedtextError, match="^--hidden-size describes a new model: it needs "
                                           "model = 'scratch'"):
        merge(ExperimentConfig(), (FLAGS, {"hidden-size": "16"}))
    with pytest.raises(FedtextError, match="not both"):
        merge(ExperimentConfig(), (FLAGS, {"eval-clients": "3", "eval-client-ids": "A"}))
    with pytest.raises(FedtextError, match="lists a client twice"):
        merge(ExperimentConfig(), (FLAGS, {"clients": "A,A"}))
    # Set across sources, checked once all are in: the TOML's hidden_size and the flag's model.
    cfg = merge(ExperimentConfig(), ("a.toml", {"model": {"hidden_size": 16}}),
                (FLAGS, {"model": "scratch"}))
    assert cfg.model.hidden_size == 16


def test_missing_file():
    with pytest.raises(FedtextError, match="no such config file: nope.toml"):
        load_toml("nope.toml")


def test_save_and_load_round_trip(tmp_path):
    cfg = merge(ExperimentConfig(), (FLAGS, {"model": "scratch", "hidden-size": "16",
                                             "clients": "A,B", "max-batches": "0",
                                             "server-optimizer": "adam", "server-lr": "0.01",
                                             "client-lr-schedule": "cosine"})).resolved()
    save_toml(cfg, tmp_path / "c.toml", header="made by a test\nsecond line")
    text = (tmp_path / "c.toml").read_text()
    assert text.startswith("# made by a test\n# second line\n")
    assert "[client.schedule]" in text and "max_batches = 0" in text  # 0: all of them
    assert load_config(tmp_path / "c.toml") == cfg
    assert from_dict(to_dict(cfg), "state") == cfg


def test_conflicts_name_only_what_the_user_asked(tmp_path):
    saved = merge(ExperimentConfig(), (FLAGS, {"server-optimizer": "sgdm", "client-lr": "1"}))
    assert conflicts(saved, (FLAGS, {"rounds": "50", "eval-every": "5", "threads": "2"})) == []
    assert conflicts(saved, (FLAGS, {"client-lr": "0.1"})) == ["client_lr=1.0 (asked: 0.1)"]
    # Spelling out what the run already resolved is no conflict (sgdm's momentum 0.9).
    assert conflicts(saved, (FLAGS, {"server-momentum": "0.9"})) == []
    f = tmp_path / "c.toml"
    f.write_text("[client]\nlr = 0.3\n")
    assert conflicts(saved, (str(f), load_toml(f))) == ["client.lr=1.0 (asked: 0.3)"]


def test_shipped_configs_load():
    from fedtext.run.tutorial import TUTORIAL

    root = ROOT / "configs"
    assert load_config(root / "tutorial.toml") == TUTORIAL  # `fedtext tutorial`'s training
    tiny = load_config(root / "tiny.toml")
    assert tiny.model.init == "scratch" and tiny.model.hidden_size <= 64
    for f in root.glob("**/*.toml"):
        load_config(f)  # every shipped config loads
