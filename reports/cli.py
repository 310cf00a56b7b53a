"""The ``report`` sub-command: ``study report NAME [-o DIR] [--format html|md|both]``.

``study/cli.py`` wires it in with :func:`add_parser`; ``python -m reports`` runs
it alone (:func:`main`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

#: output formats (kept here so that building the ``study`` parser imports no plotting)
FORMATS = ("html", "md", "both")


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db`` (the platform's default)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path('.').resolve() / 'mlflow.db').as_posix()}"


def configure(p: argparse.ArgumentParser, *, store_args: bool = True) -> None:
    """Add the report's arguments to ``p`` and set ``func`` to :func:`run`."""
    p.add_argument("name", help="study name (its MLflow experiment) or generation study name")
    p.add_argument("-o", "--output", help="output folder (default: ./report-<name>)")
    p.add_argument("--format", choices=FORMATS, default="html",
                   help="index.html, index.md or both (default html)")  # fmt: skip
    p.add_argument("--energy-run", help="run or trial id for the energy histograms "
                   "(default: the best trial with energies)")  # fmt: skip
    p.add_argument("--no-mlflow", action="store_true",
                   help="do not log it into the study's parent run (report/)")  # fmt: skip
    if store_args:
        p.add_argument(
            "--tracking-uri", help="MLflow tracking URI (default: sqlite:///./mlflow.db)"
        )
    p.set_defaults(func=run)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``report`` on the ``study`` command's sub-parsers; returns the new parser.

    The parser gets ``--tracking-uri``; when the caller adds its own store arguments
    afterwards, use :func:`configure` with ``store_args=False`` instead.
    """
    p = subparsers.add_parser(
        "report",
        help="tables, plots and one HTML report of a study, from MLflow",
        description="Write index.html (and/or index.md), PNG figures and CSV tables of a study.",
    )
    configure(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Build the report from parsed arguments, log it into the study's parent run (unless
    ``--no-mlflow``); prints the index path; returns 0."""
    from reports.build import build_report, log_report
    from reports.vocabulary import REPORT_ARTIFACT

    uri = getattr(args, "tracking_uri", None) or default_tracking_uri()
    out = Path(args.output or f"report-{args.name}")
    index = build_report(
        args.name, uri, out, args.format, energy_run=getattr(args, "energy_run", None)
    )
    print(f"report written: {index.resolve()}")
    if not getattr(args, "no_mlflow", False):
        run_id = log_report(args.name, uri, out)
        if run_id is not None:
            print(f"and logged into MLflow run {run_id} (artifacts {REPORT_ARTIFACT}/{index.name})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m reports NAME [--tracking-uri URI] [-o DIR] [--format html|md|both]``."""
    parser = argparse.ArgumentParser(prog="python -m reports", description=__doc__)
    configure(parser)
    args = parser.parse_args(argv)
    from reports.data import ReportError

    try:
        return run(args)
    except ReportError as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 2
