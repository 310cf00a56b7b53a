"""Where per-epoch metrics go: the loop calls a :class:`Reporter`, nothing else.

Ray, MLflow or a plain console each implement the same three calls, so the
epoch loop never knows who is listening. Metric names are one namespaced
vocabulary (``train/loss``, ``val/pgd_acc``, ``test/aa_acc``, ``lr`` …).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Protocol, TextIO

from trainables.files import ENERGIES_FILE, FINAL_FILE

log = logging.getLogger(__name__)


class Reporter(Protocol):
    """Receives what a training run produces."""

    def report(self, epoch: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
        """Called once per finished epoch (``epoch`` counts from 1) with that epoch's
        metrics and the path of the checkpoint written for it (or None)."""

    def final(self, metrics: dict[str, float], artifacts: dict[str, Path]) -> None:
        """Called once at the end with the test metrics and the files worth keeping."""


class NullReporter:
    """Drops everything."""

    def report(self, epoch: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
        pass

    def final(self, metrics: dict[str, float], artifacts: dict[str, Path]) -> None:
        pass


class MultiReporter:
    """Forwards every call to several reporters."""

    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = reporters

    def report(self, epoch: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
        for r in self.reporters:
            r.report(epoch, metrics, checkpoint)

    def final(self, metrics: dict[str, float], artifacts: dict[str, Path]) -> None:
        for r in self.reporters:
            r.final(metrics, artifacts)


class JsonlReporter:
    """Appends one JSON line per epoch to ``path`` and writes ``final.json`` beside it."""

    def __init__(self, path: str | Path, *, resume_epoch: int = 0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Keep only the lines of epochs that the resumed checkpoint contains.
        kept: list[str] = []
        if resume_epoch and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("epoch", 0) <= resume_epoch:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
        self.path.write_text("".join(line + "\n" for line in kept))

    def report(self, epoch: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"epoch": epoch, **metrics}) + "\n")

    def final(self, metrics: dict[str, float], artifacts: dict[str, Path]) -> None:
        out = self.path.with_name(FINAL_FILE)
        payload: dict[str, Any] = {
            "metrics": metrics,
            "artifacts": {k: str(v) for k, v in artifacts.items()},
        }
        out.write_text(json.dumps(payload, indent=2) + "\n")


class ConsoleReporter:
    """Prints an epoch table (one row per epoch) and the final test metrics.

    A metric the epoch lacks (or NaN) prints as ``-``, as wide as its column::

        >>> console = ConsoleReporter()
        >>> console.report(1, {"train/loss": 0.5, "lr": 0.1, "time/epoch_s": 1.2}, None)
        epoch     loss   train     val  val pgd     ΔE(x)   mean w        lr     sec
            1   0.5000       -       -        -         -        -   0.10000     1.2
    """

    COLUMNS = (
        ("epoch", "epoch", "{:>5d}"),
        ("train/loss", "loss", "{:>7.4f}"),
        ("train/clean_acc", "train", "{:>6.3f}"),
        ("val/clean_acc", "val", "{:>6.3f}"),
        ("val/pgd_acc", "val pgd", "{:>7.3f}"),
        ("val/delta_energy", "ΔE(x)", "{:>8.3f}"),
        ("train/mean_weight", "mean w", "{:>7.4f}"),
        ("lr", "lr", "{:>8.5f}"),
        ("time/epoch_s", "sec", "{:>6.1f}"),
    )

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self._header_done = False

    @staticmethod
    def _cell(fmt: str, value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-".rjust(len(fmt.format(0)))  # as wide as a number
        return fmt.format(value)

    def report(self, epoch: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
        if not self._header_done:
            head = "  ".join(title.rjust(len(fmt.format(0))) for _, title, fmt in self.COLUMNS)
            print(head, file=self.stream)
            self._header_done = True
        row = {"epoch": epoch, **metrics}
        print(
            "  ".join(self._cell(fmt, row.get(key)) for key, _, fmt in self.COLUMNS),
            file=self.stream,
            flush=True,
        )

    def final(self, metrics: dict[str, float], artifacts: dict[str, Path]) -> None:
        print("final test metrics:", file=self.stream)
        for key in sorted(metrics):
            value = metrics[key]
            text = f"{value:.4f}" if isinstance(value, float) else str(value)
            print(f"  {key:<28s} {text}", file=self.stream)
        for key, path in artifacts.items():
            print(f"  {key:<28s} {path}", file=self.stream)
        self.stream.flush()


def energy_histogram(npz: Path, png: Path, title: str) -> Path | None:
    """Draw the histograms of E(x) and E(x, y), natural vs adversarial test points, of a
    trial's ``energies.npz`` (``npz``: per test point energies) into ``png``, titled
    ``title``; None when there is no such file or it cannot be drawn (a figure never
    ends a study or a trial)."""
    if not npz.is_file():
        return None
    try:
        import numpy as np

        from reports.figures import energy_figure

        with np.load(npz) as z:
            arrays = {k: z[k] for k in z.files}
        return energy_figure(arrays, f"{title}: test energies", png)
    except Exception as exc:  # noqa: BLE001 - best effort
        log.warning("no energy histogram for %s: %s", npz, exc)
        return None


def draw_energy_histogram(folder: str | Path, title: str) -> Path | None:
    """On the worker, at a trial's final report: draw the histogram of the run folder's
    ``energies.npz`` into the same folder, as the file the driver uploads into the trial's
    MLflow run (``reports.vocabulary.ENERGY_HIST``), so that the final checkpoint carries
    it and the driver does not draw it. Returns its path; None when the folder has no
    energies (a stopped run) or the figure cannot be drawn.

    Args:
        folder: the run's folder (what its checkpoints are snapshots of).
        title: the figure's title, e.g. ``trial 1a2b3_00004``.
    """
    from reports.vocabulary import ENERGY_HIST

    folder = Path(folder)
    return energy_histogram(folder / ENERGIES_FILE, folder / ENERGY_HIST, title)


class EnergyHistogramReporter:
    """Draws the run's energy histogram (:func:`draw_energy_histogram`) into its folder at
    the final report, before the reporters after it in a :class:`MultiReporter` see it:
    on a Ray worker the final checkpoint then carries the figure and the driver only
    uploads it.

    Args:
        folder: the run's folder (where ``energies.npz`` is written).
        title: the figure's title, e.g. ``trial 1a2b3_00004``.
    """

    def __init__(self, folder: str | Path, title: str) -> None:
        self.folder = Path(folder)
        self.title = title

    def report(self, epoch: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
        pass

    def final(self, metrics: dict[str, float], artifacts: dict[str, Path]) -> None:
        if artifacts:  # a run that trained all its epochs (a stopped one has no energies)
            draw_energy_histogram(self.folder, self.title)
