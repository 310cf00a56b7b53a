"""The ``study`` command.

Sub-commands:

* ``study train``: one training run in this process, with a progress bar and an
  epoch table; checkpoints and metrics go to an output folder.

Errors the user can fix (a bad config value, a missing dataset, a corrupt
checkpoint) are printed as one paragraph, with no traceback, and exit with 2.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

from trainables.errors import UserError


def _cmd_train(args: argparse.Namespace) -> int:
    from trainables.checkpoint import load_checkpoint
    from trainables.config import TrainConfig, build_config, parse_overrides
    from trainables.loop import train
    from trainables.reporting import ConsoleReporter, JsonlReporter, MultiReporter

    if args.resume and not args.config:
        # The checkpoint carries its config; --set may change runtime keys only.
        saved = load_checkpoint(args.resume)
        cfg = TrainConfig.from_dict({**saved["config"], **parse_overrides(args.set)})
        start_epoch = int(saved.get("epoch", 0))
    else:
        cfg = build_config(args.config, args.set)
        start_epoch = int(load_checkpoint(args.resume)["epoch"]) if args.resume else 0
    out = Path(args.output or cfg.output_dir)
    print(
        f"training {cfg.method} on {cfg.dataset} with {cfg.model} for {cfg.epochs} epochs "
        f"(eps={cfg.eps:.4g}, {cfg.norm}); writing to {out}",
        flush=True,
    )
    reporter = MultiReporter(
        ConsoleReporter(), JsonlReporter(out / "metrics.jsonl", resume_epoch=start_epoch)
    )
    try:
        result = train(
            cfg,
            reporter=reporter,
            output_dir=out,
            resume=args.resume,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; continue with: study train --resume {out / 'checkpoints' / 'last.pt'}",
            file=sys.stderr,
        )
        return 130
    print(f"best epoch {result.best_epoch}; outputs in {result.output_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``study`` command."""
    parser = argparse.ArgumentParser(
        prog="study",
        description="Hyperparameter studies of energy-based adversarial training.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train one model in this process",
        description="Train one robust classifier; config keys are those of "
        "trainables.config.TrainConfig.",
    )
    p.add_argument("--config", help="YAML file with config keys (default: built-in defaults)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (repeatable), e.g. --set epochs=100 --set eps=8/255",
    )
    p.add_argument("-o", "--output", help="output folder (default: the config's output_dir)")
    p.add_argument("--resume", help="checkpoint (checkpoints/last.pt) to continue from")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``study`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UserError as exc:
        message = textwrap.fill(str(exc), width=100, break_long_words=False)
        print(f"study {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
