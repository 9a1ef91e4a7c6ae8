"""Loss and accuracy curves of training runs, from their metrics.jsonl, as PNG files.

    plot_runs(["runs/a", "runs/b"]) -> [runs/a/loss.png, runs/a/accuracy.png]

Train curves are the clients' pre-step training metrics of each round (dashed), eval curves
the held-out central evaluation (solid, round 0 = the starting model). A `fedtext pretrain`
run plots against steps instead (train loss, and validation loss / accuracy). matplotlib runs
with the Agg backend, so no display is needed.
"""

from __future__ import annotations

from pathlib import Path

from fedtext.errors import FedtextError


def _series(rows: list[dict], x: str, key: str) -> tuple[list[int], list[float]]:
    pts = [(r[x], r[key]) for r in rows if r.get(key) is not None and r.get(x) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(runs: list[str | Path], out: str | Path | None = None) -> list[Path]:
    """Write loss.png and accuracy.png for one run, or several runs compared.

    Args:
        runs: run directories (each with a metrics.jsonl).
        out: directory for the PNGs (default: the first run's).

    Returns:
        The paths written.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    from fedtext.paths import atomic_path
    from fedtext.run.state import read_rows

    data = []
    for run in map(Path, runs):
        if run.is_file():
            raise FedtextError(f"{run} is a file; give a run directory (with metrics.jsonl)")
        rows = read_rows(run / "metrics.jsonl")
        if not rows:
            raise FedtextError(f"{run}: no metrics.jsonl rows to plot (is it a train or "
                               "pretrain run?)")
        data.append((run, rows))
    xs = {("round" if "round" in rows[0] else "step") for _, rows in data}
    if len(xs) > 1:
        raise FedtextError("cannot plot federated runs (rounds) and pretrain runs (steps) "
                           "on the same axes; plot them separately")
    x_key = xs.pop()
    held_out = "eval" if x_key == "round" else "val"
    out = Path(out) if out else Path(runs[0])
    if out.exists() and not out.is_dir():
        raise FedtextError(f"--out {out} is a file, not a directory")
    written = []
    for metric, label in (("loss", "loss (nats / char)"), ("accuracy", "accuracy")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (run, rows) in enumerate(data):
            color = f"C{i}"
            name = run.name if len(data) > 1 else ""
            x, y = _series(rows, x_key, f"{held_out}_{metric}")
            if x:
                ax.plot(x, y, "-o", color=color, ms=3, label=f"{name} {held_out} (held out)"
                        .strip())
            x, y = _series(rows, x_key, f"train_{metric}")
            if x:
                ax.plot(x, y, "--", color=color, alpha=0.7, label=f"{name} train".strip())
        ax.set_xlabel(x_key)
        ax.set_ylabel(label)
        ax.set_title(f"{metric}: {', '.join(r.name for r, _ in data)}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        path = out / f"{metric}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
        written.append(path)
    return written
