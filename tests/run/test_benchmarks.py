"""The reddi2021 benchmark's settings: configs/reddi2021/*.toml are exactly what `fedtext
benchmark` runs, the published hyperparameters, the evaluation schedule and the figure."""

import math
from pathlib import Path

import pytest

from fedtext.cli.main import main
from fedtext.config import load_config, load_toml, merge
from fedtext.fl.server_optimizers import build
from fedtext.run.benchmarks import (
    OPTIMIZERS,
    PAPER_ACCURACY,
    final_accuracy,
    reddi2021_config,
)
from fedtext.run.evaluation import EvalConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "reddi2021"


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_checked_in_toml_is_the_benchmark(opt, tmp_path):
    assert load_config(CONFIGS / f"{opt}.toml") == reddi2021_config(opt)
    # and --write-config regenerates it byte for byte
    assert main(["benchmark", "reddi2021", "--optimizer", opt, "--write-config",
                 str(tmp_path / "c.toml")]) == 0
    assert (tmp_path / "c.toml").read_text() == (CONFIGS / f"{opt}.toml").read_text()


def test_the_published_settings():
    # google-research/federated optimization/docs/hyperparameters.md, Shakespeare row (log10).
    expected = {"avg": ("sgd", 0.0, None), "avgm": ("sgd", -0.5, None),
                "adagrad": ("adagrad", -0.5, -1), "adam": ("adam", -2, -3),
                "yogi": ("yogi", -2, -3)}
    for opt, (name, lr, eps) in expected.items():
        c = reddi2021_config(opt)
        s = c.server.resolved()
        assert s.optimizer == name and math.isclose(s.lr, 10**lr)
        if eps is not None:
            assert math.isclose(s.eps, 10**eps)
        assert (c.client.optimizer, c.client.lr, c.client.local_epochs, c.client.max_batches) \
            == ("sgd", 1.0, 1, None)
        assert (c.run.rounds, c.sampling.clients_per_round, c.sampling.method) == (
            1200, 10, "uniform")
        assert (c.data.task, c.data.batch_size, c.data.seq_len, c.data.shuffle_buffer) == (
            "reddi2021", 4, 80, 50)
        build(c.server, c.run.rounds)  # builds
    assert reddi2021_config("avgm").server.momentum == 0.9
    assert reddi2021_config("avg").server.momentum == 0.0
    for opt in ("adagrad", "yogi"):  # "For all experiments, we used initial accumulator
        assert reddi2021_config(opt).server.initial_accumulator == 0.0  # values of 0."
    assert reddi2021_config("adagrad").server.eps_placement == "outside"  # Keras' Adagrad
    for opt in ("adam", "yogi"):  # Keras defaults, "we did not [change them]"
        assert (reddi2021_config(opt).server.b1, reddi2021_config(opt).server.b2) == (0.9,
                                                                                     0.999)
    assert PAPER_ACCURACY == {"adagrad": 57.5, "adam": 57.0, "yogi": 57.2, "avgm": 57.3,
                              "avg": 56.9}


def test_evaluation_schedule():
    e = reddi2021_config("adam").eval
    due = [r for r in range(1201) if e.due(r, 1200)]
    assert due == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1100,
                   1110, 1120, 1130, 1140, 1150, 1160, 1170, 1180, 1190, 1200]
    assert e.clients is None and e.client_ids == ()  # the whole test split
    # Off by default; every round of the last 5 of a 12-round run with final_every 1.
    assert [r for r in range(13) if EvalConfig(every=10).due(r, 12)] == [0, 10, 12]
    assert [r for r in range(13) if EvalConfig(every=10, final_rounds=5).due(r, 12)] == [
        0, 8, 9, 10, 11, 12]
    assert not any(EvalConfig(every=0, final_rounds=5).due(r, 12) for r in range(13))


def test_final_accuracy_is_the_mean_of_the_last_100_rounds():
    rows = [{"round": r, "eval_accuracy": r / 1000} for r in (0, 1000, 1100, 1150, 1200)]
    rows += [{"round": r} for r in range(1, 1201)]  # rounds without an evaluation
    rows.sort(key=lambda r: r["round"])
    f = final_accuracy(rows)
    assert f["evaluations"] == 2 and f["rounds"] == (1150, 1200) and f["last_round"] == 1200
    assert math.isclose(f["accuracy"], (1.15 + 1.2) / 2)
    assert math.isnan(final_accuracy([{"round": 0, "eval_accuracy": 0.1}])["accuracy"])


def test_benchmark_flags_go_on_top_and_names_the_run(tmp_path):
    cfg = merge(reddi2021_config("yogi"), ("x", load_toml(CONFIGS / "yogi.toml")))
    assert cfg == reddi2021_config("yogi")
    assert main(["benchmark", "reddi2021", "--optimizer", "yogi"]) == 2  # --out required


def test_evaluate_batches_a_model_as_its_task_did():
    from fedtext.cli.evaluate import model_task
    from fedtext.data import vocab as V
    from fedtext.data.tasks import TASKS

    assert model_task(V.REDDI2021, {"provenance": {"task": "reddi2021"}}) is TASKS["reddi2021"]
    assert model_task(V.REDDI2021, {}) is TASKS["reddi2021"]  # found by its vocabulary
    assert model_task(V.TUTORIAL, {"provenance": {"task": "reddi2021"}}) is TASKS["tutorial"]
    other = model_task(V.KERAS, {})
    assert other.vocab == V.KERAS and not other.per_snippet
    assert TASKS["reddi2021"].data_defaults == {"batch_size": 4, "seq_len": 80}
