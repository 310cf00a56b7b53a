"""The report's figures (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from reports.analysis import Point  # noqa: E402

DPI = 110


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def pareto_figure(
    points: Sequence[Point], path: Path, clean: str, robust: str, x_label: str | None = None
) -> Path:
    """Clean vs robust accuracy of every trial; the Pareto front joined and labelled
    (``x_label``: another quantity on the x axis, e.g. FID)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    methods = sorted({p.method for p in points})
    colors = plt.cm.tab10(np.linspace(0, 1, 10))
    for i, method in enumerate(methods):
        mine = [p for p in points if p.method == method]
        ax.scatter(
            [p.clean for p in mine],
            [p.robust for p in mine],
            color=colors[i % 10],
            label=method,
            alpha=0.8,
        )
    front = sorted((p for p in points if p.pareto), key=lambda p: p.clean)
    if front:
        ax.plot([p.clean for p in front], [p.robust for p in front], "k--", lw=1, label="Pareto")
        for p in front:
            ax.annotate(p.trial_id, (p.clean, p.robust), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel(x_label or f"clean accuracy ({clean})")
    ax.set_ylabel(f"robust accuracy ({robust})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def dynamics_figure(
    curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    labels: Mapping[str, str],
    path: Path,
    keys: Sequence[tuple[str, str]],
) -> Path:
    """Per-epoch curves of the best trial of each method, one panel per metric.

    A metric no method logged gets no panel (the training-probe ΔE of an old
    study, say); more than three panels are laid out two per row. Energy-gap
    panels (``…/delta_energy``) get a line at 0.

    Args:
        curves: ``{method: {metric: [(epoch, value), ...]}}``.
        labels: legend label of each method's line.
        path: output PNG.
        keys: ``(metric, panel title)`` of each panel, in order.
    """
    shown = [(m, t) for m, t in keys if any(series.get(m) for series in curves.values())]
    keys = shown or list(keys[:1])
    cols = len(keys) if len(keys) <= 3 else 2
    nrows = -(-len(keys) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.8 * nrows), squeeze=False)
    flat = axes.ravel()
    palette = plt.cm.tab10(np.arange(10))
    colors = {method: palette[i % 10] for i, method in enumerate(curves)}  # same in every panel
    for ax, (metric, title) in zip(flat, keys):
        for method, series in curves.items():
            points = series.get(metric) or []
            if points:
                ax.plot(
                    [s for s, _ in points],
                    [v for _, v in points],
                    marker="o",
                    ms=3,
                    color=colors[method],
                    label=labels.get(method, method),
                )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if metric.endswith("delta_energy"):
            ax.axhline(0.0, color="0.5", lw=0.8, ls=":")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in flat[len(keys) :]:
        ax.set_axis_off()
    if flat[0].get_legend_handles_labels()[0]:
        flat[0].legend(fontsize=8)
    return _save(fig, path)


def energy_figure(arrays: Mapping[str, np.ndarray], title: str, path: Path) -> Path:
    """Histograms of E(x) and E(x, y) for natural vs adversarial test points (Fig. 2)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = (
        ("energy_nat", "energy_adv", "E(x)"),
        ("joint_energy_nat", "joint_energy_adv", "E(x, y)"),
    )
    for ax, (nat, adv, name) in zip(axes, panels):
        if nat not in arrays or adv not in arrays:
            ax.text(0.5, 0.5, f"no {name} in energies.npz", ha="center", va="center")
            ax.set_axis_off()
            continue
        a, b = np.asarray(arrays[nat], float), np.asarray(arrays[adv], float)
        both = np.concatenate([a, b])
        both = both[np.isfinite(both)]
        bins = np.linspace(both.min(), both.max(), 40) if both.size and np.ptp(both) > 0 else 20
        ax.hist(a, bins=bins, alpha=0.55, label="natural", color="tab:blue")
        ax.hist(b, bins=bins, alpha=0.55, label="adversarial", color="tab:red")
        ax.set_xlabel(name)
        ax.set_ylabel("test points")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def importance_figure(values: Mapping[str, float], evaluator: str, path: Path) -> Path:
    """Horizontal bars of the parameter importances."""
    names = list(values)[::-1]
    fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(names) + 1.4))
    ax.barh(names, [values[n] for n in names], color="tab:green")
    ax.set_xlabel(f"importance ({evaluator})")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def parallel_figure(
    rows: Sequence[Mapping[str, str]], objective: Sequence[float], metric: str, path: Path
) -> Path:
    """Parallel coordinates: one line per trial over its searched params, coloured by objective.

    Numeric params are scaled to [0, 1] between their min and max; categorical
    ones are spread evenly in sorted order (ticks name them). A param a trial
    did not sample (a conditional one) leaves a gap in its line.
    """
    names = sorted({k for r in rows for k in r})
    axes_values: dict[str, dict[str, float]] = {}
    ticks: dict[str, list[tuple[float, str]]] = {}
    for name in names:
        raw = sorted({r[name] for r in rows if name in r})
        try:
            nums = {v: float(v) for v in raw}
        except ValueError:
            pos = {v: (i / (len(raw) - 1) if len(raw) > 1 else 0.5) for i, v in enumerate(raw)}
            axes_values[name] = pos
            ticks[name] = [(p, v) for v, p in pos.items()]
            continue
        lo, hi = min(nums.values()), max(nums.values())
        axes_values[name] = {v: (n - lo) / (hi - lo) if hi > lo else 0.5 for v, n in nums.items()}
        ticks[name] = [(0.0, f"{lo:.3g}"), (1.0, f"{hi:.3g}")] if hi > lo else [(0.5, f"{lo:.3g}")]
    fig, ax = plt.subplots(figsize=(max(6.4, 1.8 * len(names) + 1.5), 4.2))
    vals = np.asarray(objective, float)
    norm = plt.Normalize(np.nanmin(vals), np.nanmax(vals)) if vals.size else plt.Normalize(0, 1)
    cmap = plt.cm.viridis
    for row, value in zip(rows, vals):
        ys = [axes_values[n][row[n]] if n in row else np.nan for n in names]
        ax.plot(range(len(names)), ys, color=cmap(norm(value)), marker="o", alpha=0.85)
    for i, name in enumerate(names):
        ax.axvline(i, color="0.6", lw=0.8)
        for y, text in ticks[name]:
            ax.annotate(text, (i, y), textcoords="offset points", xytext=(3, 0), fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.08, 1.08)
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, label=metric)
    return _save(fig, path)
