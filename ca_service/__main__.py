"""``python -m ca_service`` is the same as the ``ca-service`` console script."""

from ca_service.cli import main

raise SystemExit(main())
