"""``python -m krtfuap``: the same command line as the ``krtfuap`` script."""

from krtfuap.apps.cli import main

raise SystemExit(main())
