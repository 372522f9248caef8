"""The ConfigMap's daemon config through the daemon's own validation, while keys are still landing.

The manifests use the config keys agreed between sessions (storage.kubernetes.lease_*, istiod.*_secret
/ *_configmap, istio_ca.*, grpc[].tls.dns_names). Until their owners' branches are merged some of
them do not exist in :mod:`ca_service.settings` yet: :func:`strip_pending` removes exactly those (and
only keys listed in ``PENDING_KEYS``), so everything else is validated now. Once a pending key exists,
the test that uses this fails until the key is taken off the list: the stub cannot outlive its reason.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from ca_service.settings import Settings

# Agreed in /work/wt/prompts/keys.md; owners: k8s (issue 12) and istio (issue 13).
PENDING_KEYS: frozenset[str] = frozenset()
# Problems the daemon reports today for values the pending work makes valid.
PENDING_PROBLEMS: frozenset[str] = frozenset()


def _dataclass_of(tp: Any) -> tuple[Any, bool]:
    """(dataclass type, is a list of them) for a field annotation, or (None, False)."""
    for arg in (tp, *typing.get_args(tp)):
        if typing.get_origin(arg) is tuple:
            item = typing.get_args(arg)[0]
            if dataclasses.is_dataclass(item):
                return item, True
        if dataclasses.is_dataclass(arg):
            return arg, False
    return None, False


def key_exists(path: str, cls: Any = Settings) -> bool:
    """Whether a dotted key (``grpc[].tls.dns_names``) is a field of the settings tree."""
    head, _, rest = path.partition(".")
    name = head.removesuffix("[]")
    hints = typing.get_type_hints(cls)
    if name not in hints:
        return False
    if not rest:
        return True
    sub, _ = _dataclass_of(hints[name])
    return sub is not None and key_exists(rest, sub)


def strip_pending(doc: dict[str, Any], cls: Any = Settings, prefix: str = "") -> tuple[dict[str, Any], set[str]]:
    """``doc`` without the keys :class:`Settings` does not know yet, and those keys (dotted)."""
    hints = typing.get_type_hints(cls)
    kept: dict[str, Any] = {}
    removed: set[str] = set()
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if key not in hints:
            removed.add(path)
            continue
        sub, is_list = _dataclass_of(hints[key])
        if sub is not None and is_list and isinstance(value, list):
            items = [strip_pending(v, sub, f"{path}[].") if isinstance(v, dict) else (v, set()) for v in value]
            kept[key] = [item for item, _ in items]
            removed.update(*(r for _, r in items))
        elif sub is not None and isinstance(value, dict):
            kept[key], sub_removed = strip_pending(value, sub, f"{path}.")
            removed |= sub_removed
        else:
            kept[key] = value
    return kept, removed
