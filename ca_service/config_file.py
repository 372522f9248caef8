"""Reading the config file: bounded, UTF-8 only, no YAML aliases, bounded nesting.

Each rule turns an input that used to crash the loader or hang it (``/dev/zero``, a UTF-16 file, a
10k-deep document, a billion-laughs alias bomb) into one clear problem line.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

# A real config is a few KiB; 1 MiB bounds what a wrong path (a log file, /dev/zero) makes us read.
MAX_CONFIG_BYTES = 1 << 20
# The schema is four levels deep; 32 leaves room for any hand-written nesting and stops a
# 10k-deep document long before the YAML composer's recursion would.
MAX_CONFIG_DEPTH = 32


def _read_config_bytes(path: Path) -> bytes:
    """At most ``MAX_CONFIG_BYTES`` of a regular file (never blocks on a FIFO or reads a device forever)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ValueError("is not a regular file")
        raw = handle.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"is larger than {MAX_CONFIG_BYTES} bytes")
    return raw


def check_yaml_shape(text: str) -> None:
    """Refuse aliases (a billion-laughs document expands exponentially when constructed) and deep
    nesting, by walking the parser's event stream, which is linear in the text and not recursive."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise ValueError("uses a YAML alias (*name); aliases are not allowed in the config")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_CONFIG_DEPTH:
                raise ValueError(f"is nested deeper than {MAX_CONFIG_DEPTH} levels")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def read_config_document(path: Path) -> dict[str, Any]:
    """The top-level mapping of the YAML file at ``path`` (``{}`` for an empty file).

    Raises:
        ValueError: with a one-line message naming ``path`` and what is wrong with it.
    """
    try:
        raw = _read_config_bytes(path)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ValueError(f"{path} {exc}") from None
    try:
        text = raw.decode("utf-8")
        if "\x00" in text:
            raise UnicodeError("NUL byte")
    except UnicodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    try:
        check_yaml_shape(text)
        doc = yaml.safe_load(text)
    except ValueError as exc:
        raise ValueError(f"{path} {exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {_one_line(str(exc))}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path} must hold a mapping at the top level")
    return doc


def _one_line(text: str) -> str:
    # PyYAML's messages quote the offending text over several lines; a config error is one line each.
    return " ".join(text.split())[:300]
