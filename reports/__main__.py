"""``python -m reports NAME --tracking-uri URI -o DIR --format html``."""

from reports.cli import main

raise SystemExit(main())
