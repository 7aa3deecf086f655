"""`python -m blockd` is the same as the `blockd` console script."""

from blockd.cli import main

raise SystemExit(main())
