"""Plots of a run's metrics.jsonl (loss curves and the composite Amax gain over training) and of the
stability study's runs (mhc_jax/study/stability.py)."""

import io
import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib import ticker

from mhc_jax import storage
from mhc_jax.model import residual


def read_metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (storage.path(workdir) / "metrics.jsonl").read_text().splitlines()]


def series(records: list[dict], key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(workdir):
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
    _plain_log_labels(gain_axes)
    gain_axes.legend()
    figure.suptitle(storage.path(workdir).name)
    return _save(figure, storage.path(workdir) / "run.png", dpi=100)


# The stability study (mhc_jax/study/stability.py): one color per variant; lr x1 solid with the seeds' range
# shaded, the stress learning rate dashed.
PALETTE = ("tab:gray", "tab:red", "tab:orange", "tab:blue", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:green")
COLORS = dict(zip(residual.VARIANTS, PALETTE))  # a new variant takes the next color


def smooth(values: list[float], window: int) -> np.ndarray:
    """Trailing moving average (the first points average what there is)."""
    cumulative = np.cumsum(np.insert(np.asarray(values, float), 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    ends = np.arange(1, len(values) + 1)
    return (cumulative[ends] - cumulative[ends - counts]) / counts


def _band(axes, curves: list[tuple[list, list]], color: str, label: str, marker: str | None = None):
    """Mean over seeds with the min-max range shaded, on the steps every seed has."""
    common = sorted(set.intersection(*(set(steps) for steps, _ in curves)))
    values = np.array([[dict(zip(*curve))[s] for s in common] for curve in curves])
    axes.plot(common, values.mean(0), color=color, label=label, marker=marker, markersize=3, linewidth=1.2)
    if len(curves) > 1:
        axes.fill_between(common, values.min(0), values.max(0), color=color, alpha=0.2, linewidth=0)


def _finite_series(records: list[dict], key: str) -> tuple[list, list]:
    steps, values = series(records, key)
    keep = [i for i, v in enumerate(values) if v is not None and np.isfinite(v)]
    return [steps[i] for i in keep], [values[i] for i in keep]


def _draw(axes, label: str, factor: float, curves: list[tuple[list, list]], marker: str | None = None):
    """A variant at lr x1: the seeds' mean and range; at another learning rate, or with another
    setting (a label beyond the variant's name): one line per seed in the variant's color, dashed
    for a higher learning rate, dotted for a lower one, dash-dotted for another setting."""
    color = COLORS[label.split()[0]]
    if factor == 1.0 and label in COLORS:
        _band(axes, curves, color, f"{label} (lr x1, {len(curves)} seed{'s' * (len(curves) > 1)})", marker)
        return
    style = "-." if label not in COLORS else ("--" if factor > 1.0 else ":")
    for steps, values in curves:
        axes.plot(steps, values, style, color=color, linewidth=1.2, label=f"{label} (lr x{factor:g})")


def _study_curves(axes, runs: dict, key: str, transform=None, marker=None):
    """runs: {(label, lr_factor): [records of each seed]}, a label a variant's name or more (Run.label)."""
    for (label, factor), seeds in runs.items():
        curves = [_finite_series(records, key) for records in seeds]
        curves = [(s, transform(v) if transform else v) for s, v in curves if s]
        if curves:
            _draw(axes, label, factor, curves, marker)


def plot_study_losses(runs: dict, path: Path, window: int) -> Path:
    figure, (train_axes, eval_axes) = plt.subplots(1, 2, figsize=(11, 4))
    _study_curves(train_axes, runs, "loss", transform=lambda v: smooth(v, window).tolist())
    _study_curves(eval_axes, runs, "eval_loss", marker="o")
    train_axes.set(xlabel="step", ylabel="loss (nats/token)", title=f"train loss ({window}-step moving average)")
    eval_axes.set(xlabel="step", ylabel="loss (nats/token)", title="validation loss")
    for axes in (train_axes, eval_axes):
        low, high = axes.get_ylim()
        axes.set_ylim(low, min(high, low + 4))  # the first steps' loss would flatten the rest
    _study_legend(figure, train_axes)
    return _save(figure, path)


def _gain_axes(axes, title: str, xlabel: str, legend: bool = True):
    axes.set(xlabel=xlabel, ylabel="composite Amax gain", title=title, yscale="log")
    axes.axhline(1.0, color="black", linewidth=0.5)
    _plain_log_labels(axes)
    if legend:
        axes.legend(fontsize=8)


def _study_legend(figure, axes):
    """One legend for a study figure's two panels, to their right, where it hides no curve."""
    figure.legend(*axes.get_legend_handles_labels(), loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8)


def _plain_log_labels(axes):
    """1.05 rather than 1.05 x 10^0 on a log axis that spans less than a decade (call after plotting)."""
    low, high = axes.get_ylim()
    if high < 10 * low:
        axes.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        axes.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))


def plot_study_amax(runs: dict, path: Path) -> Path:
    figure, (forward, backward) = plt.subplots(1, 2, figsize=(11, 4))
    _study_curves(forward, runs, "amax_forward", marker="o")
    _study_curves(backward, runs, "amax_backward", marker="o")
    _gain_axes(forward, "forward: max row sum of the composite map, max over sites", "step", legend=False)
    _gain_axes(backward, "backward: max column sum, max over sites", "step", legend=False)
    _study_legend(figure, forward)
    return _save(figure, path)


def plot_study_sites(runs: dict, path: Path) -> Path:
    """Per-site composite Amax gain at the last measurement (the map from each site to the output)."""
    figure, (forward, backward) = plt.subplots(1, 2, figsize=(11, 4))
    for axes, key in ((forward, "amax_forward_per_site"), (backward, "amax_backward_per_site")):
        for (label, factor), seeds in runs.items():
            finals = [next((r[key] for r in reversed(records) if key in r and np.isfinite(r[key]).all()), None)
                      for records in seeds]
            curves = [(list(range(len(f))), f) for f in finals if f]
            if curves:
                _draw(axes, label, factor, curves)
    sites = "site (layer l: 2l attention, 2l+1 MLP)"
    _gain_axes(forward, "forward gain of the map from each site to the output", sites, legend=False)
    _gain_axes(backward, "backward gain of the same maps", sites, legend=False)
    _study_legend(figure, forward)
    return _save(figure, path)


def plot_h_res(maps: dict, path: Path) -> Path:
    """Heat maps of hc's and mhc's H_res at one site and of their composite over all sites."""
    layer, sublayer = divmod(maps["site"], 2)
    where = f"site {maps['site']} (layer {layer} {('attention', 'MLP')[sublayer]})"
    figure, grid = plt.subplots(2, 2, figsize=(8, 7.5))
    for row, variant in enumerate(("hc", "mhc")):
        panels = (("single", f"H_res at {where}"), ("composite", "composite over all sites"))
        for column, (kind, title) in enumerate(panels):
            matrix, axes = np.array(maps[variant][kind]), grid[row, column]
            image = axes.imshow(matrix, cmap="RdBu_r", norm=matplotlib.colors.CenteredNorm(0.0))
            for (i, j), value in np.ndenumerate(matrix):
                dark = abs(value) > 0.6 * np.abs(matrix).max()
                axes.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=8,
                          color="white" if dark else "black")
            rows, columns = np.abs(matrix.sum(1)).max(), np.abs(matrix.sum(0)).max()
            axes.set(title=f"{variant}: {title}\nmax |row sum| {rows:.3g}, max |column sum| {columns:.3g}",
                     xticks=range(len(matrix)), yticks=range(len(matrix)))
            axes.title.set_fontsize(9)
            figure.colorbar(image, ax=axes, fraction=0.046)
    figure.suptitle("H_res, mean over the tokens of one validation batch (row i makes the new stream i)", fontsize=10)
    return _save(figure, path)


def _save(figure, path, dpi: int = 80):
    """Writes the figure as a PNG to a local path or a bucket path (storage.py)."""
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=dpi, bbox_inches="tight")  # with a legend beside the axes
    plt.close(figure)
    path = storage.path(path)
    path.write_bytes(png.getvalue())
    return path


# scripts/compare.py: runs grouped {scale: {row label: [(tokens per step, records) of each seed]}}.
def _color(label: str) -> str:
    return COLORS.get(label.split(" ")[0], "tab:green")


def _per_scale_axes(tables: dict, title: str):
    figure, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 4), squeeze=False)
    for ax, scale in zip(axes[0], tables):
        ax.set_title(f"{scale}: {title}")
    return figure, axes[0]


def plot_comparison_losses(tables: dict, path, window: int = 10):
    """Train loss (moving average, mean and range over seeds) and validation loss against tokens."""
    figure, axes = _per_scale_axes(tables, "loss against tokens")
    for ax, rows in zip(axes, tables.values()):
        for label, seeds in rows.items():
            train = [([s * per_step for s in steps], smooth(values, window).tolist())
                     for per_step, records in seeds for steps, values in [_finite_series(records, "loss")] if steps]
            evals = [([s * per_step for s in steps], values)
                     for per_step, records in seeds for steps, values in [_finite_series(records, "eval_loss")] if steps]
            if train:
                _band(ax, train, _color(label), f"{label} train ({len(train)} seeds)")
            if evals:
                _band(ax, evals, _color(label), f"{label} validation", marker="o")
        ax.set(xlabel="tokens", ylabel="loss (nats/token)")
        ax.legend(fontsize=7)
    return _save(figure, path)


def plot_comparison_amax(tables: dict, path):
    """The composite forward Amax gain (max over sites) over training, per variant."""
    figure, axes = _per_scale_axes(tables, "composite Amax forward")
    for ax, rows in zip(axes, tables.values()):
        for label, seeds in rows.items():
            curves = [curve for _, records in seeds for curve in [_finite_series(records, "amax_forward")] if curve[0]]
            if curves:
                _band(ax, curves, _color(label), label, marker="o")
        _gain_axes(ax, ax.get_title(), "step")
    return _save(figure, path)


def plot_scaling(points: dict, path):
    """points: {row label: [(parameters, mean final validation loss, min, max)]}, the paper's scaling figure."""
    figure, ax = plt.subplots(figsize=(6, 4))
    for label, values in points.items():
        values = sorted(values)
        x, mean, low, high = (np.array(v) for v in zip(*values))
        ax.errorbar(x, mean, yerr=[mean - low, high - mean], marker="o", capsize=3, color=_color(label), label=label)
    ax.set(xscale="log", xlabel="parameters", ylabel="final validation loss", title="final loss against model size")
    ax.legend(fontsize=8)
    return _save(figure, path)
