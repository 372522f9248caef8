"""Run the real ``ca-service`` console with a fault injected into the state write (test harness, not a fake).

    python launcher.py crash-before-rename N -- ARGS...   SIGKILL itself inside the N-th commit of the CA
                                                          state: after the temp file is written and fsynced,
                                                          before it is renamed over the record
    python launcher.py crash-after-rename N -- ARGS...    SIGKILL itself right after the N-th rename, before
                                                          the directory fsync
    python launcher.py none 0 -- ARGS...                  no fault

The fault goes in by wrapping ``os.rename`` for this process only; the daemon's code is unchanged.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

STATE_TEMP = ".tmp-authority.json"


def _install(mode: str, nth: int) -> None:
    real_rename = os.rename
    seen = 0

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal seen
        if STATE_TEMP not in os.fspath(src):
            return real_rename(src, dst, *args, **kwargs)
        seen += 1
        if seen == nth and mode == "crash-before-rename":
            os.kill(os.getpid(), signal.SIGKILL)
        real_rename(src, dst, *args, **kwargs)
        if seen == nth and mode == "crash-after-rename":
            os.kill(os.getpid(), signal.SIGKILL)
        return None

    os.rename = rename  # type: ignore[assignment]


def main() -> int:
    mode, nth, sep, *args = sys.argv[1:]
    assert sep == "--", __doc__
    if mode != "none":
        _install(mode, int(nth))
    from ca_service.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
