"""``python -m ca_service`` is the same as the ``ca-service`` console script."""

from ca_service.cli import main

# Guarded although multiprocessing's spawn skips a package's __main__ when it starts a signing-pool
# worker: importing this module must never start a second daemon.
if __name__ == "__main__":
    raise SystemExit(main())
