"""`fedtext report`: the HTML of real and benchmark-shaped run directories, rendered in headless
Chromium (not blank, no console errors, nothing fetched but the file itself)."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from browser import blankness, find_browser, render, required
from helpers import make_clients

from fedtext.cli.benchmark import write_eval_clients, write_samples
from fedtext.cli.main import main
from fedtext.config import FLAGS, ExperimentConfig, merge, save_toml
from fedtext.run.benchmarks import reddi2021_config
from fedtext.run.report import load_run, write_report
from fedtext.run.train import train

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def browser_or_skip():
    if find_browser() is None:
        if required():
            pytest.fail("FEDTEXT_REQUIRE_BROWSER=1 but no chromium is installed")
        pytest.skip("no chromium (apt-get install chromium; .ci/run does)")


def fake_reddi_run(root: Path, opt: str, rounds: int = 300, acc: float = 0.55) -> Path:
    """A reddi2021-shaped run directory: its real config, rows evaluated like the benchmark's
    (every 100 rounds and every 10th of the last 100), per-client accuracies and samples."""
    run = root / f"reddi2021-{opt}"
    run.mkdir(parents=True)
    cfg = merge(reddi2021_config(opt), (FLAGS, {"rounds": str(rounds)}))
    save_toml(cfg.resolved(), run / "config.toml")
    rng = np.random.default_rng(len(opt))
    rows = []
    for r in range(rounds + 1):
        row = {"round": r, "clients": 10 if r else 0, "chars": 40000 if r else 0,
               "seconds": 2.0}
        if r:
            row |= {"train_loss": 3.5 - r / rounds + 0.1 * rng.random(),
                    "train_accuracy": acc * r / rounds + 0.02 * rng.random(),
                    "delta_norm": 1.0, "compute": "kernel/avx512/fp32"}
        if cfg.eval.due(r, rounds):
            a = acc * min(1.0, 0.1 + r / rounds)
            row |= {"eval_loss": 4.5 - 3 * a, "eval_accuracy": a, "eval_clients": 1154,
                    "eval_chars": 940389, "eval_accuracy_p10": a - 0.05,
                    "eval_accuracy_p50": a, "eval_accuracy_p90": a + 0.05,
                    "eval_unweighted_accuracy": a - 0.01}
        rows.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    clients = [{"id": f"C{i}", "chars": 100 + i, "accuracy": float(np.clip(
        rng.normal(acc, 0.06), 0, 1)), "loss": 1.5} for i in range(300)]
    (run / "eval_clients.json").write_text(json.dumps({"round": rounds, "clients": clients}))
    (run / "samples.json").write_text(json.dumps([{
        "prompt": "My lord, ", "temperature": 0.8, "seed": 0, "length": 40,
        "text": "My lord, I will <not> & go\nto the king."}]))
    return run


def test_report_of_benchmark_runs_renders_in_chromium(tmp_path):
    runs = [fake_reddi_run(tmp_path, opt, acc=a) for opt, a in (("avg", 0.55), ("adam", 0.56))]
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "report.html")]) == 0
    text = (tmp_path / "report.html").read_text()
    # The summary: the method, our figure (mean of the 10 evals in the last 100 rounds),
    # and the paper's beside it; every figure inline; escaped sample text; no script.
    assert "FedAvg" in text and "FedAdam" in text and "56.9%" in text and "57.0%" in text
    assert text.count("<svg") == 3 and "<script" not in text.lower()
    assert "&lt;not&gt; &amp; go" in text
    assert "every 100 rounds (and after the last), and every 10 within the last 100" in text
    assert not re.findall(r"(?:src|href)\s*=\s*[\"']?\s*(?:https?:|//)", text)  # nothing to fetch
    run = load_run(runs[1])
    assert run.method == "FedAdam" and run.paper == 57.0
    browser_or_skip()
    shot = render(tmp_path / "report.html")
    assert shot.errors == []
    assert shot.requests == [(tmp_path / "report.html").resolve().as_uri()]
    b = blankness(shot.png)
    assert b["ink"] > 0.05 and b["colours"] > 50 and b["height"] > 2000, b


def test_report_of_a_real_training_run(tmp_path):
    data = make_clients(tmp_path / "clients", n=6)
    cfg = merge(ExperimentConfig(), (FLAGS, {
        "data": str(data), "model": "scratch", "embed-dim": "8", "hidden-size": "16",
        "rounds": "2", "clients-per-round": "2", "max-batches": "2", "client-lr": "1.0"}))
    res = train(cfg, tmp_path / "run", progress=False, tensorboard=False, log=lambda s: None)
    write_eval_clients(res.out, res.model, res.eval_set, res.state.round)
    write_samples(res.out, 30)
    out = write_report([res.out], tmp_path / "r.html")
    text = out.read_text()
    assert "sgd lr 1" in text and text.count("<svg") == 3  # no paper column for it
    ec = json.loads((res.out / "eval_clients.json").read_text())
    assert len(ec["clients"]) == 6 and ec["round"] == 2
    pooled = sum(c["accuracy"] * c["chars"] for c in ec["clients"]) / sum(
        c["chars"] for c in ec["clients"])
    assert math.isclose(pooled, res.rows[-1]["eval_accuracy"], rel_tol=1e-9)
    (sample,) = [s for s in json.loads((res.out / "samples.json").read_text())
                 if s["prompt"] == "My lord, "]
    assert sample["text"].startswith("My lord, ") and len(sample["text"]) == 9 + 30


def test_report_refuses_what_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


@pytest.mark.skipif(not list((REPO / "benchmarks" / "results").glob("reddi2021-*")),
                    reason="no committed benchmark results yet")
def test_report_accepts_the_committed_results(tmp_path):
    runs = sorted((REPO / "benchmarks" / "results").glob("reddi2021-*"))
    text = write_report(runs, tmp_path / "r.html").read_text()
    for run in runs:
        assert load_run(run).method in text


def test_browser_harness_sees_console_errors_and_requests(tmp_path):
    browser_or_skip()
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><body><p>x</p><script>console.error('boom');"
                    "not_defined();</script><img src='http://fedtext.invalid/x.png'>"
                    "</body></html>")
    shot = render(page)
    assert any("boom" in e for e in shot.errors)
    assert any("not_defined" in e for e in shot.errors)
    assert "http://fedtext.invalid/x.png" in shot.requests
