"""List+watch loops, each in its own thread, delivering to the event loop.

:class:`ResourceWatch` is the generic loop (what client-go's reflector does, without a cache): list,
then watch from the list's resourceVersion; after a broken stream resume from the last resourceVersion
seen; on 410 Gone ("too old") list again; through an API outage keep retrying with capped, jittered
backoff.  The thread blocks only in the HTTP read, and :meth:`ResourceWatch.stop` shuts that socket
down, so stopping is immediate (the client's ``watch.Watch`` cannot be interrupted mid-read).

:class:`SecretWatch` follows the CA state Secret and hands each newer :class:`Record` to a callback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from ca_service.errors import StorageError
from ca_service.kube.client import REQUEST_TIMEOUT, TRANSPORT_ERRORS, api_message
from ca_service.kube.store import RESOURCE, record_data
from ca_service.storage.base import AUTHORITY_RECORD, Record

log = logging.getLogger(__name__)

Obj = dict[str, Any]
# Server-side end of one watch request: the stream is re-opened from the last resourceVersion after it,
# so a half-open connection (a silently dropped TCP path) is noticed within this bound.
WATCH_SECONDS = 60
# Read timeout of the watch request: a little past WATCH_SECONDS, so the server's orderly end comes first.
_WATCH_READ_TIMEOUT = WATCH_SECONDS + 15
# Outage backoff: start fast (a broken stream is usually a blip), cap at 5 s so a replica resyncs within
# seconds of the API server's return; one list per 5 s per replica is no load on a recovering server.
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 5.0


class Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


class ResourceWatch:
    """Lists and watches one collection; ``on_list(items)`` and ``on_event(type, obj)`` run in the event loop."""

    def __init__(self, what: str, list_fn: Callable[..., Any], kwargs: dict[str, Any], *,
                 on_list: Callable[[list[Obj]], None], on_event: Callable[[str, Obj], None]) -> None:
        self.what = what
        self._list_fn = list_fn
        self._kwargs = kwargs
        self._on_list = on_list
        self._on_event = on_event
        self._stopping = threading.Event()
        self._response: Any = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.resource_version: str | None = None
        self.failures = 0  # consecutive failed attempts; 0 while the stream is healthy
        self.lists = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"watch-{self.what}", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping.set()
        response = self._response
        if response is not None:
            response.shutdown()  # unblocks the thread's read at once
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, REQUEST_TIMEOUT[0] + REQUEST_TIMEOUT[1])
            self._thread = None

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        backoff = BACKOFF_INITIAL
        while not self._stopping.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                self._watch()
                backoff = BACKOFF_INITIAL
                self.failures = 0
            except Gone:
                log.info("watch of %s expired (410 Gone); listing again", self.what)
                self.resource_version = None
            except (ApiException, *TRANSPORT_ERRORS, ValueError) as exc:
                if self._stopping.is_set():
                    break
                self.failures += 1
                cause = api_message(exc) if isinstance(exc, ApiException) else f"{type(exc).__name__}: {exc}"
                log.warning("watch of %s broken; retrying", self.what,
                            extra={"cause": cause[:300], "retry_in_s": round(backoff, 2), "failures": self.failures})
                # Jitter keeps replicas that lost the API together from relisting in lockstep; not crypto.
                self._stopping.wait(backoff * random.uniform(0.8, 1.2))  # noqa: S311
                backoff = min(backoff * 2, BACKOFF_MAX)

    def _list(self) -> None:
        response = self._list_fn(**self._kwargs, _preload_content=False, _request_timeout=REQUEST_TIMEOUT)
        try:
            doc = json.loads(response.data)
        finally:
            response.release_conn()
        self.lists += 1
        self._deliver(self._on_list, list(doc.get("items") or []))
        self.resource_version = doc["metadata"]["resourceVersion"]

    def _watch(self) -> None:
        response = self._list_fn(**self._kwargs, watch=True, resource_version=self.resource_version,
                                 allow_watch_bookmarks=True, timeout_seconds=WATCH_SECONDS, _preload_content=False,
                                 _request_timeout=(REQUEST_TIMEOUT[0], _WATCH_READ_TIMEOUT))
        self._response = response
        try:
            if self._stopping.is_set():
                return
            for line in response:
                if self._stopping.is_set():
                    return
                if line.strip():
                    self._handle(json.loads(line))
        finally:
            self._response = None
            response.release_conn()

    def _handle(self, event: Obj) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise ValueError(f"watch error {obj.get('code')}: {str(obj.get('message'))[:300]}")
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind != "BOOKMARK":
            self._deliver(self._on_event, str(kind), obj)
        if version:
            self.resource_version = version

    def _deliver(self, handler: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_guarded, handler, self.what, *args)


def _guarded(handler: Callable[..., None], what: str, *args: Any) -> None:
    try:
        handler(*args)
    except Exception:  # a consumer's bug must not end the watch
        log.exception("handler of the %s watch failed", what)


class SecretWatch:
    """Calls ``callback(record)`` in the event loop with every version of the state Secret newer than the
    last one delivered (or than ``known_version``, the one the caller already holds).

    The caller's own commits come back too (their version is the one it just wrote); it compares.
    """

    def __init__(self, api: Any, namespace: str, secret_name: str, callback: Callable[[Record], None], *,
                 known_version: str | None = None, record_name: str = AUTHORITY_RECORD) -> None:
        self.namespace = namespace
        self.secret_name = secret_name
        self.last_version = known_version
        self._callback = callback
        self._record_name = record_name
        self.watch = ResourceWatch(
            f"{RESOURCE}/{secret_name} in {namespace}", client.CoreV1Api(api).list_namespaced_secret,
            {"namespace": namespace, "field_selector": f"metadata.name={secret_name}"},
            on_list=self._on_list, on_event=self._on_event)

    name = "state-secret-watch"

    async def start(self) -> None:
        await self.watch.start()

    async def stop(self) -> None:
        await self.watch.stop()

    def _on_list(self, items: list[Obj]) -> None:
        for obj in items:
            self._offer(obj)

    def _on_event(self, kind: str, obj: Obj) -> None:
        if kind in ("ADDED", "MODIFIED"):
            self._offer(obj)
        elif kind == "DELETED":
            # Serving goes on from memory; the leader's next commit (a create-if-absent) fails loudly.
            log.error("the CA state Secret was deleted", extra={"namespace": self.namespace,
                                                                 "secret": self.secret_name})

    def _offer(self, obj: Obj) -> None:
        version = obj["metadata"]["resourceVersion"]
        if version == self.last_version:
            return
        try:
            record = Record(self._record_name, record_data(obj.get("data")), version)
        except StorageError:
            log.exception("ignoring an unreadable version of the state Secret", extra={"version": version})
            return
        self.last_version = version
        self._callback(record)
