"""Plots of a run's metrics.jsonl: loss curves and the composite Amax gain over training."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402


def read_metrics(workdir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def series(records: list[dict], key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(workdir: str | Path) -> Path:
    """WORKDIR/run.png: train and validation loss (left), composite Amax gain, log scale (right)."""
    records = read_metrics(workdir)
    figure, (loss_axes, gain_axes) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axes.plot(*series(records, "loss"), label="train", linewidth=1)
    loss_axes.plot(*series(records, "eval_loss"), "o-", label="validation")
    loss_axes.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    loss_axes.legend()
    gain_axes.plot(*series(records, "amax_forward"), "o-", label="forward (max row sum)")
    gain_axes.plot(*series(records, "amax_backward"), "s-", label="backward (max column sum)")
    gain_axes.set(xlabel="step", ylabel="composite Amax gain", title="stability: max over sites", yscale="log")
    gain_axes.axhline(1.0, color="gray", linewidth=0.5)
    gain_axes.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))  # not 1.05 x 10^0 on short ranges
    gain_axes.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
    gain_axes.legend()
    figure.suptitle(Path(workdir).name)
    figure.tight_layout()
    path = Path(workdir) / "run.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
