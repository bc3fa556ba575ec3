"""``python -m radfed``: the command line."""

from radfed.cli import main

raise SystemExit(main())
