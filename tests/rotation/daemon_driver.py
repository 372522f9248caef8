"""A real daemon for the SIGKILL test: ``build_app`` + signals, optionally forcing a root rotation at start.

Usage: python daemon_driver.py CONFIG [--force-root]
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from ca_service.app import build_app
from ca_service.config import load_settings
from ca_service.logs import configure_logging
from ca_service.services.ports import RotationRequest, RotationScope


async def main(config: Path, force_root: bool) -> None:
    settings = load_settings(config, environ={})
    configure_logging(settings.logging)
    app = build_app(settings)
    await app.start()
    if force_root:
        assert app.rotator is not None
        await app.rotator.rotate(RotationRequest(RotationScope.ROOT, reason="sigkill test", caller="test"))
    try:
        await asyncio.Event().wait()
    finally:
        await app.stop()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), "--force-root" in sys.argv[2:]))
