"""Reporters: the console table lines up whatever metrics an epoch has."""

from __future__ import annotations

import io
import re

from trainables.reporting import ConsoleReporter


def _right_edges(line: str) -> list[int]:
    return [m.end() for m in re.finditer(r"\S+", line)]


def test_console_table_cells_are_as_wide_as_their_columns() -> None:
    stream = io.StringIO()
    console = ConsoleReporter(stream)
    console.report(1, {"train/loss": 0.5, "lr": 0.1, "time/epoch_s": 1.2}, None)
    full = {
        "train/loss": 0.25,
        "train/clean_acc": 0.8,
        "val/clean_acc": 0.9,
        "val/pgd_acc": 0.5,
        "val/delta_energy": 1.5,
        "train/mean_weight": 0.7,
        "lr": 0.05,
        "time/epoch_s": 2.0,
    }
    console.report(2, full, None)
    console.report(3, {**full, "val/pgd_acc": float("nan")}, None)
    head, sparse, dense, with_nan = stream.getvalue().splitlines()
    # a missing or NaN value is a "-" as wide as a number: every row lines up with the header
    widths = [5, 7, 6, 6, 7, 8, 7, 8, 6]
    assert len(head) == len(sparse) == len(dense) == len(with_nan) == sum(widths) + 2 * 8
    assert sparse.split() == ["1", "0.5000", "-", "-", "-", "-", "-", "0.10000", "1.2"]
    assert _right_edges(sparse) == _right_edges(dense) == _right_edges(with_nan)
    assert set(_right_edges(dense)) <= set(_right_edges(head))
