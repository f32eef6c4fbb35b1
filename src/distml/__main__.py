"""``python -m distml`` is the same as the ``distml`` console script."""

from distml.cli.main import main

raise SystemExit(main())
