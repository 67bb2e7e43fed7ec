"""The broker layer: the one module that knows kombu's Redis layout and Celery's message
and result layouts, and the reliable delivery the project keeps beside them.

Queues are kombu's: a Redis list per queue, priority sub-lists ``q\\x06\\x16{3,6,9}``, each
message a JSON envelope (kombu's) around a Celery protocol-2 task message. Anything that
publishes through Celery or kombu lands in the same lists in the same format.

Consuming is the project's own, so that no message is ever only in a worker's memory:

- A worker blocks on *wake* lists (one token per queue, pushed by producers beside the
  message), never on the queues themselves. Woken, it runs the fetch script, which pops up
  to its free room from its queues in priority order and records every message in its
  *held* hash, in one atomic step. A worker killed at any instant loses no message: it is
  in a queue or in a held hash. A lost wake token only delays (every wait ends within a
  second and fetches anyway).
- Each held entry names the list it goes back to and the model version it counts for.
  ``held_counts`` (version -> messages held by any worker) moves with the held hashes
  inside the same scripts, so queued + held is exact at any instant.
- A live worker renews its *lease* (``leases``: consumer -> deadline, in Redis's clock)
  with every report. The expiry sweep and the scaler's failover give a dead worker's held
  messages back to the head of their queues; acknowledging a message that was given back
  meanwhile changes nothing (delivery is at least once).
- Results are stored as Celery stores them (``celery-task-meta-<id>``, SETEX) in the same
  round trip as the acknowledgement, before it. A request published by this project's
  producers names its process's reply channel: the result is published there, where one
  subscription per producer process receives all its results. Other requests get
  Celery's per-task channel.

Supported versions are pinned: a kombu or Celery release that changes these layouts must
fail the contract tests (``tests/test_broker.py``), not production.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import operator
import os
import socket
import struct
import threading
import time
import uuid
from bisect import bisect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import celery
import kombu
import msgpack
import redis
from celery import states
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu.serialization import dumps as kombu_dumps
from kombu.serialization import loads as kombu_loads
from kombu.serialization import registry as serializers

from common import keys
from common.errors import PayloadTooLargeError, RejectedMessageError
from tasks import codec

# -- versions -------------------------------------------------------------------------------
# The releases whose layouts the contract tests were run against.
SUPPORTED = {"kombu": ((5, 7), (5, 8)), "celery": ((5, 7), (5, 8))}


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def check_versions(installed: dict[str, str] | None = None) -> None:
    installed = installed or {"kombu": kombu.__version__, "celery": celery.__version__}
    for name, (low, high) in SUPPORTED.items():
        if not low <= _release(installed[name]) < high:
            raise ImportError(
                f"{name} {installed[name]} is installed; this project's broker layer needs "
                f"{name}>={low[0]}.{low[1]},<{high[0]}.{high[1]} (pip install -e .)"
            )


check_versions()

# -- kombu's Redis layout --------------------------------------------------------------------
# kombu's separator between a queue and its priority sub-list, and its priority steps:
# one list per step, the lowest step served first.
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
# Celery's result key and per-task channel.
RESULT_PREFIX = "celery-task-meta-"
# Header naming the reply channel of the producer process waiting for the result.
REPLY_HEADER = "reply_channel"
# Header of the queue-wait metric: when the producer published (epoch seconds).
PUBLISHED_HEADER = "published_at"
# Header of a request published while no instance served its version: its wait until the
# answer is a cold start as callers see it.
COLD_START_HEADER = "cold_start"
# ``body_encoding`` of the msgpack envelope: the body's bytes as they are.
BINARY = "binary"


def priority_step(priority: int | None) -> int:
    p = max(0, min(int(priority or 0), 9))
    return PRIORITY_STEPS[bisect(PRIORITY_STEPS, p) - 1]


def priority_list(queue: str, priority: int | None) -> str:
    """The list a message of this priority goes to."""
    step = priority_step(priority)
    return queue if step == 0 else f"{queue}{PRIORITY_SEPARATOR}{step}"


def queue_lists(queue: str) -> list[str]:
    """A queue's lists, the one served first first."""
    return [queue] + [f"{queue}{PRIORITY_SEPARATOR}{s}" for s in PRIORITY_STEPS if s]


def result_key(task_id: str) -> str:
    return f"{RESULT_PREFIX}{task_id}"


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# -- Celery's task message -------------------------------------------------------------------
_ORIGIN = f"gen{os.getpid()}@{socket.gethostname()}"
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


class TaskIds:
    """Random task ids in uuid4 form, from a per-thread pool of system entropy (one system
    call per 256 ids, not one per id); a forked child draws its own."""

    def __init__(self) -> None:
        self._local = threading.local()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._local = threading.local()

    def __call__(self) -> str:
        local = self._local
        pool: str = getattr(local, "pool", "")
        at: int = getattr(local, "at", 0)
        if at >= len(pool):
            pool, at = os.urandom(2048).hex(), 0
            local.pool = pool
        local.at = at + 32
        h = pool[at : at + 32]
        variant = "89ab"[int(h[16], 16) & 3]
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:]}"


new_task_id = TaskIds()


def encode_task_message(
    task_name: str,
    task_id: str,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    *,
    queue: str,
    serializer: str,
    priority: int = 0,
    expires: datetime | None = None,
    reply_channel: str | None = None,
    headers: dict[str, Any] | None = None,
    max_body_bytes: int | None = None,
) -> bytes:
    """Celery's protocol-2 message in kombu's envelope, with the fields ``send_task``
    writes, packed with msgpack and the body's bytes kept raw (kombu's JSON would carry
    them base64-encoded: a third more to move and a decode the worker pays per request).
    The worker reads both forms."""
    payload = (list(args), kwargs, _EMBED)
    if serializer == codec.SERIALIZER:  # the hot path, without the registry's wrappers
        content_type, content_encoding, body = codec.CONTENT_TYPE, "binary", codec.dumps(payload)
    else:
        content_type, content_encoding, body = kombu_dumps(payload, serializer=serializer)
    if isinstance(body, str):
        body = body.encode(content_encoding or "utf-8")
    if max_body_bytes is not None and len(body) > max_body_bytes:
        raise PayloadTooLargeError(
            f"request of {len(body)} bytes exceeds the limit of {max_body_bytes} bytes "
            "(MAX_PAYLOAD_BYTES)"
        )
    step = max(0, min(int(priority or 0), 9))
    tid = task_id.encode()
    expiry = _expiry(expires)
    if not headers and len(tid) == _ID_LEN:
        # The usual request: only its id, body, time and expiry differ from a template.
        expiring = expiry is not None
        key = (task_name, queue, reply_channel, step, content_type, content_encoding, expiring)
        if key in _templates:
            template = _templates[key]
        else:
            template = _Template.build(key)
            if len(_templates) < 1024:
                _templates[key] = template
        if template is not None:
            return template.fill(tid, body, time.time(), expiry)
    return _pack_envelope(
        task_name, task_id, body, content_type, content_encoding, queue=queue, priority=step,
        expiry=expiry, reply_channel=reply_channel, headers=headers, published=time.time(),
    )  # fmt: skip


def _expiry(expires: datetime | None) -> tuple[str, str] | None:
    """Celery's ``expires`` header and kombu's ``expiration`` property (ms from now), made
    once for a burst's shared expiry."""
    if expires is None:
        return None
    global _last_expiry
    now = time.monotonic()
    last = _last_expiry
    if last is None or last[0] != expires or now - last[1] > EXPIRES_STEP_S:
        remaining = (expires - datetime.now(timezone.utc)).total_seconds()
        last = _last_expiry = (
            expires,
            now,
            (expires.isoformat(), str(int(max(remaining, 0) * 1000))),
        )
    return last[2]


_last_expiry: tuple[datetime, float, tuple[str, str]] | None = None


def _pack_envelope(
    task_name: str,
    task_id: str,
    body: bytes,
    content_type: str,
    content_encoding: str,
    *,
    queue: str,
    priority: int,
    expiry: tuple[str, str] | None,
    reply_channel: str | None,
    headers: dict[str, Any] | None,
    published: float,
) -> bytes:
    message_headers: dict[str, Any] = {
        "lang": "py",
        "task": task_name,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": expiry[0] if expiry is not None else None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "",
        "kwargsrepr": "",
        "origin": _ORIGIN,
        "ignore_result": False,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
        PUBLISHED_HEADER: published,
    }
    if reply_channel is not None:
        message_headers[REPLY_HEADER] = reply_channel
    if headers:
        message_headers.update(headers)
    properties: dict[str, Any] = {
        "correlation_id": task_id,
        "reply_to": reply_channel or "",
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue},
        "priority": priority,
        "body_encoding": BINARY,
        "delivery_tag": task_id,
    }
    if expiry is not None:
        properties["expiration"] = expiry[1]
    return bytes(
        msgpack.packb(
            {
                "body": body,
                "content-encoding": content_encoding,
                "content-type": content_type,
                "headers": message_headers,
                "properties": properties,
            },
            use_bin_type=True,
        )
    )


_ID_LEN = 36  # a UUID's text: the ids this project makes, and Celery's
_ID_MARK = "\x01" * _ID_LEN
_TIME_MARK = 5e-324  # packed as 0xcb 00 00 00 00 00 00 00 01
_EXPIRES_MARK = "\x02" * 40
_EXPIRATION_MARK = "\x03" * 12
_FLOAT = struct.Struct(">d")
# The slots of a template, in the order ``fill`` supplies their bytes.
_SLOTS = (
    _ID_MARK.encode(),
    msgpack.packb(_TIME_MARK),
    msgpack.packb(_EXPIRES_MARK),
    msgpack.packb(_EXPIRATION_MARK),
)


class _Template:
    """An envelope packed once with marks where the task id, the publish time and the
    expiry go, cut there: a message is its pieces and its slots' bytes joined (byte for
    byte what ``_pack_envelope`` packs)."""

    def __init__(self, prefix: bytes, pieces: list[bytes], slots: list[int]) -> None:
        self.prefix = prefix
        # The pieces as one %-format with a %b per slot, filled from the slots' values.
        self.format = b"%b".join(p.replace(b"%", b"%%") for p in pieces)
        self.pick = operator.itemgetter(*slots)

    @classmethod
    def build(cls, key: tuple[Any, ...]) -> _Template | None:
        task_name, queue, reply_channel, priority, content_type, content_encoding, expiring = key
        packed = _pack_envelope(
            task_name, _ID_MARK, b"", content_type, content_encoding, queue=queue,
            priority=priority, reply_channel=reply_channel, headers=None, published=_TIME_MARK,
            expiry=(_EXPIRES_MARK, _EXPIRATION_MARK) if expiring else None,
        )  # fmt: skip
        prefix = b"\x85" + msgpack.packb("body") + b"\xc4\x00"  # a map of 5; body first
        rest = packed[len(prefix) :]
        wanted = [4, 1, 1, 1] if expiring else [4, 1, 0, 0]
        if not packed.startswith(prefix) or [rest.count(m) for m in _SLOTS] != wanted:
            return None  # a mark's bytes occur elsewhere: pack each message in full
        pieces, slots, at = [], [], 0
        while True:
            found = [(i, n) for n, m in enumerate(_SLOTS) if (i := rest.find(m, at)) >= 0]
            if not found:
                break
            i, n = min(found)
            pieces.append(rest[at:i])
            slots.append(n)
            at = i + len(_SLOTS[n])
        pieces.append(rest[at:])
        return cls(prefix[:-2], pieces, slots)

    def fill(
        self, task_id: bytes, body: bytes, published: float, expiry: tuple[str, str] | None
    ) -> bytes:
        n = len(body)
        if n < 0x100:
            head = b"\xc4" + n.to_bytes(1, "big")
        elif n < 0x10000:
            head = b"\xc5" + n.to_bytes(2, "big")
        else:
            head = b"\xc6" + n.to_bytes(4, "big")
        if expiry is None:
            values: tuple[bytes, ...] = (task_id, b"\xcb" + _FLOAT.pack(published))
        else:
            values = (
                task_id,
                b"\xcb" + _FLOAT.pack(published),
                msgpack.packb(expiry[0]),
                msgpack.packb(expiry[1]),
            )
        return b"".join((self.prefix, head, body, self.format % self.pick(values)))


_templates: dict[tuple[Any, ...], _Template | None] = {}


def read_envelope(raw: bytes) -> dict[str, Any]:
    """A message's envelope: kombu's JSON (what Celery and kombu publish), or the same
    fields packed with msgpack (what this project's producers publish)."""
    envelope = json.loads(raw) if raw[:1] == b"{" else msgpack.unpackb(raw, raw=False)
    if not isinstance(envelope, dict):
        raise ValueError("not a message envelope")
    return envelope


EXPIRES_STEP_S = 0.01


def expires_at(expires: float | datetime | None) -> datetime | None:
    """Celery's ``expires`` (seconds from now, or a datetime) as an aware datetime; seconds
    are rounded up to ``EXPIRES_STEP_S``, so the requests of a burst share one (and one
    packing of it)."""
    if expires is None:
        return None
    if isinstance(expires, datetime):
        return expires if expires.tzinfo else expires.replace(tzinfo=timezone.utc)
    global _last_expires
    step = math.ceil((time.time() + float(expires)) / EXPIRES_STEP_S)
    last = _last_expires
    if last[0] != step:
        last = _last_expires = (step, datetime.fromtimestamp(step * EXPIRES_STEP_S, timezone.utc))
    return last[1]


_last_expires: tuple[int, datetime] = (0, datetime.fromtimestamp(0, timezone.utc))


@dataclass
class TaskMessage:
    """A delivered task message, decoded."""

    task_id: str
    task_name: str
    args: list[Any]
    kwargs: dict[str, Any]
    headers: dict[str, Any]
    priority: int
    expires: datetime | None
    reply_channel: str | None
    published_at: float | None

    @property
    def cold_start(self) -> bool:
        return bool(self.headers.get(COLD_START_HEADER))

    @property
    def expired(self) -> bool:
        return self.expires is not None and self.expires <= datetime.now(timezone.utc)


@dataclass
class Refused(Exception):
    """A delivered message that can never run: its caller (if named) gets ``error``."""

    error: Exception
    task_id: str | None = None
    reply_channel: str | None = None

    def __str__(self) -> str:
        return str(self.error)


def decode_task_message(raw: bytes, *, accept: Iterable[str], max_body_bytes: int) -> TaskMessage:
    """Decode a message as a worker receives it; raises ``Refused`` for one that can never
    run (a pickle, a body over the limit, garbage), naming its task where it can."""
    try:
        envelope = read_envelope(raw)
        headers = envelope["headers"]
        properties = envelope["properties"]
    except (ValueError, KeyError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
        raise Refused(RejectedMessageError(f"undecodable message envelope: {exc}")) from None
    task_id = headers.get("id") if isinstance(headers, dict) else None
    reply = headers.get(REPLY_HEADER) if isinstance(headers, dict) else None
    task_name = headers.get("task") if isinstance(headers, dict) else None

    def refuse(error: Exception) -> Refused:
        return Refused(error, task_id if isinstance(task_id, str) else None, reply)

    if not isinstance(task_name, str) or not isinstance(task_id, str):
        raise refuse(RejectedMessageError("not a Celery protocol-2 task message"))
    body = envelope.get("body") or b""
    if not isinstance(body, bytes | str):
        raise refuse(RejectedMessageError(f"undecodable {task_name} request: no body"))
    if properties.get("body_encoding") == "base64":  # kombu's JSON envelope
        if len(body) * 3 // 4 > max_body_bytes:
            raise refuse(_too_large(len(body) * 3 // 4, max_body_bytes))
        try:
            body = base64.b64decode(body)
        except ValueError as exc:
            raise refuse(RejectedMessageError(f"undecodable {task_name} request: {exc}")) from None
    if len(body) > max_body_bytes:
        raise refuse(_too_large(len(body), max_body_bytes))
    content_type = envelope.get("content-type")
    accepted = {serializers.name_to_type.get(name, name) for name in accept}
    if content_type not in accepted:
        raise refuse(
            RejectedMessageError(
                f"content type {content_type!r} is not accepted; use one of {sorted(accept)}"
            )
        )
    try:
        if content_type == codec.CONTENT_TYPE:  # the hot path, without the registry
            decoded = codec.loads(body)
        else:
            decoded = kombu_loads(
                body, content_type, envelope.get("content-encoding"), accept=accepted
            )
        args, kwargs = list(decoded[0]), dict(decoded[1] or {})
    except Exception as exc:  # garbage from a producer: its caller hears of it
        raise refuse(RejectedMessageError(f"undecodable {task_name} request: {exc}")) from None
    expires = headers.get("expires")
    published = headers.get(PUBLISHED_HEADER)
    try:
        expiry = datetime.fromisoformat(expires) if isinstance(expires, str) else None
    except ValueError:
        expiry = None
    if expiry is not None and expiry.tzinfo is None:
        expiry = expiry.replace(tzinfo=timezone.utc)
    return TaskMessage(
        task_id=task_id,
        task_name=task_name,
        args=args,
        kwargs=kwargs,
        headers=headers,
        priority=int(properties.get("priority") or 0),
        expires=expiry,
        reply_channel=reply if isinstance(reply, str) else None,
        published_at=float(published) if isinstance(published, int | float) else None,
    )


def _too_large(size: int, limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"request of {size} bytes exceeds the limit of {limit} bytes (MAX_PAYLOAD_BYTES)"
    )


# -- Celery's result layout ------------------------------------------------------------------
def result_meta(
    app: Any,
    task_id: str,
    state: str,
    value: Any,
    *,
    date_done: str | None = None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """A result as Celery's Redis backend stores it (``value`` an exception for failures;
    ``date_done`` defaults to now); ``extra`` adds fields (Celery's extended ``worker`` and
    ``queue``, this project's ``inference``)."""
    backend = app.backend
    if state in states.EXCEPTION_STATES:
        value = backend.prepare_exception(value)
    meta = {
        "status": state,
        "result": value,
        "traceback": None,
        "children": [],
        "date_done": date_done or datetime.now(timezone.utc).isoformat(),
        "task_id": task_id,
    }
    if extra:
        meta.update(extra)
    if backend.serializer == codec.SERIALIZER:  # the hot path, without the registry
        return codec.dumps(meta)
    return bytes(backend.encode(meta))


def decode_result(backend: Any, raw: bytes) -> dict[str, Any]:
    """A stored result as Celery's backend decodes it (the result serializer is always the
    project's msgpack codec; read directly, without the serializer registry's checks)."""
    meta = codec.loads(raw)
    if not isinstance(meta, dict) or "status" not in meta:
        raise RejectedMessageError(f"not a stored result: {raw[:80]!r}")
    return dict(backend.meta_from_decoded(meta))


def reply_payload(results: Sequence[tuple[str, bytes]]) -> bytes:
    """What a reply channel carries: task ids and their stored results, packed as one
    msgpack array ``[id, result, id, result, ...]`` (a batch's results for one producer
    process in one message)."""
    return bytes(msgpack.packb([x for pair in results for x in pair], use_bin_type=True))


def split_reply(payload: bytes) -> list[tuple[str, bytes]]:
    """A reply channel's message as (task id, stored result) pairs; none if malformed."""
    try:
        items = msgpack.unpackb(payload, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return []
    if not isinstance(items, list) or len(items) % 2:
        return []
    pairs = list(zip(items[::2], items[1::2], strict=True))
    return [(t, m) for t, m in pairs if isinstance(t, str) and isinstance(m, bytes)]


def results_commands(
    results: Sequence[tuple[str, bytes, str | None]], *, expires_s: int
) -> list[tuple[Any, ...]]:
    """Store results, then announce them to whoever waits: one message per producer's
    reply channel, or Celery's per-task channel for a request that names none."""
    commands: list[tuple[Any, ...]] = [
        STORE.command(
            [result_key(t) for t, _, _ in results], [expires_s, *(m for _, m, _ in results)]
        )
    ]
    by_channel: dict[str, list[tuple[str, bytes]]] = {}
    for task_id, meta, channel in results:
        if channel is None:
            commands.append(("PUBLISH", result_key(task_id), meta))
        else:
            by_channel.setdefault(channel, []).append((task_id, meta))
    for channel, pairs in by_channel.items():
        commands.append(("PUBLISH", channel, reply_payload(pairs)))
    return commands


def result_commands(
    task_id: str, meta: bytes, *, expires_s: int, reply_channel: str | None
) -> list[tuple[Any, ...]]:
    """Store one result, then announce it."""
    return results_commands([(task_id, meta, reply_channel)], expires_s=expires_s)


class InferenceResult(AsyncResult):
    """Celery's ``AsyncResult`` whose results arrive on the producer process's reply channel
    (``tasks.replies``). ``get``, ``ready``, ``state`` and ``AsyncResult(id)`` of a request
    sent by another process keep Celery's meaning."""

    _cache: dict[str, Any] | None
    waiter: Any = None  # keeps this request registered with the reply channel

    hub: Any = None  # the reply channel it arrives on

    @classmethod
    def sent(cls, task_id: str, app: Any, hub: Any, waiter: Any) -> InferenceResult:
        """The result of a request this process just published (Celery's constructor
        builds a promise and looks the backend up per call: a fifth of a publish)."""
        result = cls.__new__(cls)
        result.app, result.id, result.backend = app, task_id, app.backend
        result.parent, result._cache, result._ignored = None, None, False
        result.hub, result.waiter = hub, waiter
        return result

    @property
    def on_ready(self) -> Any:  # Celery's promise, made when something asks for it
        ready = self.__dict__.get("_on_ready")
        if ready is None:
            from vine import promise

            ready = self.__dict__["_on_ready"] = promise(self._on_fulfilled, weak=True)
        return ready

    @on_ready.setter
    def on_ready(self, value: Any) -> None:
        self.__dict__["_on_ready"] = value

    def _replies(self) -> Any:
        if self.hub is None:
            from tasks.replies import replies_for

            self.hub = replies_for()
        return self.hub

    def get(
        self,
        timeout: float | None = None,
        propagate: bool = True,
        interval: float = 0.5,
        no_ack: bool = True,
        follow_parents: bool = True,
        callback: Any = None,
        on_message: Any = None,
        on_interval: Any = None,
        disable_sync_subtasks: bool = True,
        **_: Any,
    ) -> Any:
        meta = self._cache
        if meta is None:
            meta = decode_result(self.backend, self._replies().wait(self.id, timeout))
            self._cache = meta
        if callback is not None:
            callback(self.id, meta["result"])
        if meta["status"] in states.PROPAGATE_STATES and propagate:
            raise meta["result"]
        return meta["result"]

    wait = get

    @property
    def inference(self) -> dict[str, Any] | None:
        """How the request was served: ``version``, ``batch_size``, ``queue_wait_ms`` (from
        publish to its batch's start) and ``inference_ms`` (the batch's forward pass); the
        worker is Celery's ``worker``, the queue ``queue``."""
        info = self._get_task_meta().get("inference")
        return dict(info) if info else None

    def __del__(self) -> None:
        """Nothing to cancel: no per-request subscription exists (Celery's would)."""

    def _get_task_meta(self) -> dict[str, Any]:
        if self._cache is None:
            raw = self._replies().peek(self.id)
            if raw is not None:
                return self._maybe_set_cache(self.backend.decode_result(raw))
        return super()._get_task_meta()


def not_answered(task_id: str, timeout: float | None, *, lost: bool) -> CeleryTimeoutError:
    from common.errors import RequestLostError

    if lost:
        return RequestLostError(
            f"no answer to {task_id} within {timeout} s, and Redis restarted after it was "
            "queued: a Redis without persistence lost it"
        )
    return CeleryTimeoutError(f"no answer to {task_id} within {timeout} s")


# -- scripts ---------------------------------------------------------------------------------
# Every held entry is "<list to give it back to>\n<version label>\n<message>".

# KEYS: held hash, leases, held counts, lists..., wake lists...
# ARGV: room, lease seconds, consumer, tag prefix, number of lists, then per list: the list
# to give its messages back to, their version label, the index of its wake list (1-based);
# then the scaler's poke channel and backlog key prefix.
# Returns tag, list index, message for every message taken. A consumer that filled its room
# and left messages behind pokes the scaler about their versions (at most once a second
# each): a burst is seen within milliseconds, not at the next tick.
_FETCH = """
local room = tonumber(ARGV[1])
local nlists = tonumber(ARGV[5])
local out = {}
local counts = {}
local waiting = {}
local backlog = {}
local seq = 0
for i = 1, nlists do
  local key = KEYS[3 + i]
  local base = 5 + (i - 1) * 3
  if room > 0 then
    local items = redis.call('RPOP', key, room)
    if items then
      local back, label = ARGV[base + 1], ARGV[base + 2]
      for _, raw in ipairs(items) do
        seq = seq + 1
        local tag = ARGV[4] .. string.format('%06d', seq)
        redis.call('HSET', KEYS[1], tag, back .. '\\n' .. label .. '\\n' .. raw)
        out[#out + 1] = tag
        out[#out + 1] = i
        out[#out + 1] = raw
      end
      room = room - #items
      counts[label] = (counts[label] or 0) + #items
    end
  end
  if redis.call('LLEN', key) > 0 then
    waiting[tonumber(ARGV[base + 3])] = true
    backlog[ARGV[base + 2]] = true
  end
end
for label, n in pairs(counts) do redis.call('HINCRBY', KEYS[3], label, n) end
if room == 0 then
  local poke = 6 + nlists * 3
  for label in pairs(backlog) do
    if redis.call('SET', ARGV[poke + 1] .. label, '1', 'NX', 'PX', 1000) then
      redis.call('PUBLISH', ARGV[poke], label)
    end
  end
end
if seq > 0 then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(ARGV[2]), ARGV[3])
end
for w = 1, #KEYS - 3 - nlists do
  local wake = KEYS[3 + nlists + w]
  redis.call('DEL', wake)
  if waiting[w] then redis.call('LPUSH', wake, '1') end
end
return out
"""

# KEYS: held hash, held counts. ARGV: tag, label, tag, label, ...
_ACK = """
local done = 0
for i = 1, #ARGV, 2 do
  if redis.call('HDEL', KEYS[1], ARGV[i]) == 1 then
    done = done + 1
    if redis.call('HINCRBY', KEYS[2], ARGV[i + 1], -1) <= 0 then
      redis.call('HDEL', KEYS[2], ARGV[i + 1])
    end
  end
end
return done
"""

# Shared by the scripts that give messages back: to the head of their list, oldest served
# first, each list's wake token set, each version's held count lowered.
_GIVE_BACK = """
local function give_back(held, counts, wake_prefix, tags)
  table.sort(tags, function(a, b) return a > b end)
  local moved = 0
  for _, tag in ipairs(tags) do
    local entry = redis.call('HGET', held, tag)
    if entry then
      local a = string.find(entry, '\\n', 1, true)
      local b = string.find(entry, '\\n', a + 1, true)
      local back = string.sub(entry, 1, a - 1)
      local label = string.sub(entry, a + 1, b - 1)
      redis.call('RPUSH', back, string.sub(entry, b + 1))
      redis.call('HDEL', held, tag)
      if redis.call('HINCRBY', counts, label, -1) <= 0 then redis.call('HDEL', counts, label) end
      local sep = string.find(back, '\\6\\22', 1, true)
      local wake = wake_prefix .. (sep and string.sub(back, 1, sep - 1) or back)
      if redis.call('LLEN', wake) == 0 then redis.call('LPUSH', wake, '1') end
      moved = moved + 1
    end
  end
  return moved
end
"""

# KEYS: held hash, held counts. ARGV: wake prefix, tags...
_RETURN = (
    _GIVE_BACK
    + """
local tags = {}
for i = 2, #ARGV do tags[#tags + 1] = ARGV[i] end
return give_back(KEYS[1], KEYS[2], ARGV[1], tags)
"""
)

# Move every message of an instance queue to the head of its shared queue, order kept.
_DRAIN = """
local function drain(instance, shared, wake_prefix)
  local moved = 0
  for _, suffix in ipairs({'', '\\6\\0223', '\\6\\0226', '\\6\\0229'}) do
    while redis.call('LMOVE', instance .. suffix, shared .. suffix, 'LEFT', 'RIGHT') do
      moved = moved + 1
    end
  end
  if moved > 0 and redis.call('LLEN', wake_prefix .. shared) == 0 then
    redis.call('LPUSH', wake_prefix .. shared, '1')
  end
  return moved
end
"""

# KEYS: leases, held counts, instance queue set. ARGV: held prefix, wake prefix, consumer
# (empty: every consumer whose lease expired), instance queue prefix, shared queue prefix.
# A gone consumer's held messages go back, and so does what waits in its instance queues.
_RELEASE = (
    _GIVE_BACK
    + _DRAIN
    + """
local consumers = {}
if ARGV[3] ~= '' then
  consumers[1] = ARGV[3]
else
  local t = redis.call('TIME')
  consumers = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', tonumber(t[1]))
end
local moved = 0
for _, consumer in ipairs(consumers) do
  for _, queue in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    local at = string.find(queue, '@', #ARGV[4] + 1, true)
    if at and string.sub(queue, at + 1) == consumer then
      local shared = ARGV[5] .. string.sub(queue, #ARGV[4] + 1, at - 1)
      moved = moved + drain(queue, shared, ARGV[2])
      redis.call('SREM', KEYS[3], queue)
    end
  end
  -- What it held was taken before what still waited for it: served first.
  local held = ARGV[1] .. consumer
  moved = moved + give_back(held, KEYS[2], ARGV[2], redis.call('HKEYS', held))
  redis.call('DEL', held)
  redis.call('ZREM', KEYS[1], consumer)
end
return moved
"""
)

# KEYS: registered shared queues, queues that get priorities, instance queues, held counts.
# ARGV: priority suffixes. Returns {queue, depth, ...} for non-empty queues and the held
# counts as {label, n, ...}: read in one step, so that nothing is counted twice or missed.
_LOAD = """
local depth = {}
for _, q in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local n = redis.call('LLEN', q)
  if n > 0 then depth[q] = n end
end
for _, q in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local n = depth[q] or 0
  for i = 1, #ARGV do n = n + redis.call('LLEN', q .. ARGV[i]) end
  if n > 0 then depth[q] = n end
end
for _, q in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local n = redis.call('LLEN', q)
  for i = 1, #ARGV do n = n + redis.call('LLEN', q .. ARGV[i]) end
  if n > 0 then depth[q] = (depth[q] or 0) + n end
end
local queued = {}
for q, n in pairs(depth) do
  queued[#queued + 1] = q
  queued[#queued + 1] = n
end
return {queued, redis.call('HGETALL', KEYS[4])}
"""


# A full Redis (maxmemory, noeviction) refuses producers at the door, but the scripts of the
# consumers (fetch, answer, acknowledge, give back, heartbeat) may write past the limit
# (Redis 7's allow-oom flag): draining a queue frees more than its answers take.
_ALLOW_OOM = "#!lua flags=allow-oom\n"

# KEYS: result keys. ARGV: seconds to keep them, then one result per key.
_STORE = """
for i, key in ipairs(KEYS) do redis.call('SET', key, ARGV[i + 1], 'EX', ARGV[1]) end
return #KEYS
"""

# KEYS: the worker's report, the workers' set, leases. ARGV: report, its TTL, time, name,
# lease seconds. The lease is renewed only here: a worker that stops reporting loses it.
_HEARTBEAT = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
local t = redis.call('TIME')
redis.call('ZADD', KEYS[3], tonumber(t[1]) + tonumber(ARGV[5]), ARGV[4])
return 1
"""


# KEYS: a routing state hash. ARGV: field, how many left.
_IN_FLIGHT_DONE = """
return redis.call('HINCRBY', KEYS[1], ARGV[1], -tonumber(ARGV[2]))
"""


class Script:
    """A Lua script run by its SHA, loaded again after a Redis restart forgot it."""

    registry: list[Script] = []

    def __init__(self, source: str) -> None:
        self.source = source
        import hashlib

        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - Redis's own id
        Script.registry.append(self)

    def command(self, keys_: Sequence[Any], args: Sequence[Any]) -> tuple[Any, ...]:
        return ("EVALSHA", self.sha, len(keys_), *keys_, *args)


FETCH = Script(_ALLOW_OOM + _FETCH)
ACK = Script(_ALLOW_OOM + _ACK)
RETURN = Script(_ALLOW_OOM + _RETURN)
RELEASE = Script(_ALLOW_OOM + _RELEASE)
STORE = Script(_ALLOW_OOM + _STORE)
HEARTBEAT = Script(_ALLOW_OOM + _HEARTBEAT)
IN_FLIGHT_DONE = Script(_ALLOW_OOM + _IN_FLIGHT_DONE)
LOAD = Script(_LOAD)


Execute = Callable[[Sequence[tuple[Any, ...]]], list[Any]]


def load_scripts(client: redis.Redis) -> None:
    for script in Script.registry:
        client.script_load(script.source)


def run(client: redis.Redis, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Commands in one round trip, in order; errors raise after every reply is read."""
    if not commands:
        return []
    for attempt in (1, 2):
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        try:
            return list(pipe.execute())
        except redis.exceptions.NoScriptError:
            if attempt == 2:
                raise
            load_scripts(client)  # a restarted Redis forgot them
    raise AssertionError("unreachable")


# -- the operations --------------------------------------------------------------------------
def wake_key(queue: str) -> str:
    return keys.WAKE_PREFIX + queue


def publish_commands(queue: str, priority: int | None, message: bytes) -> list[tuple[Any, ...]]:
    """Queue a message and leave a wake token for a waiting consumer. Tokens left while
    every consumer was busy are cleared by the next fetch (one left if messages remain)."""
    return [("LPUSH", priority_list(queue, priority), message), ("LPUSH", wake_key(queue), b"1")]


@dataclass(frozen=True)
class Source:
    """A queue a consumer reads: where its messages go back to, what they count for."""

    queue: str
    shared: str  # its version's shared queue (itself, or the queue an instance queue feeds)
    label: str  # the version's "name/version"
    forward: bool = False  # read only to send its messages on to the shared queue


@dataclass
class Fetched:
    tag: str
    source: Source
    raw: bytes


class ConsumerState:
    """What one consumer (a worker, by hostname) reads and holds, in Redis terms; the
    parts of its fetch that only change with its sources are built once per change."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.held_key = keys.HELD_PREFIX + name
        self._prefix = f"{name}:{uuid.uuid4().hex[:8]}:"
        self._count = 0
        self._lock = threading.Lock()
        self.sources: list[Source] = []
        self._lists: list[tuple[str, Source]] = []
        self._keys: list[str] = []
        self._args: list[Any] = []
        self._wait: tuple[str, ...] = ()

    def set_sources(self, sources: list[Source]) -> None:
        # In priority order: every source's step-0 list first, then step 3, 6, 9.
        lists = [
            (queue_lists(source.queue)[step], source)
            for step in range(len(PRIORITY_STEPS))
            for source in sources
        ]
        wakes = [wake_key(s.queue) for s in sources]
        wake_index = {s.queue: i + 1 for i, s in enumerate(sources)}
        args: list[Any] = [len(lists)]
        for name, source in lists:
            args += [
                source.shared + name[len(source.queue) :],
                source.label,
                wake_index[source.queue],
            ]
        args += [keys.SCALER_POKE, keys.SCALER_BACKLOG_PREFIX]
        self._lists, self._args, self._wait = lists, args, tuple(wakes)
        self._keys = [self.held_key, keys.LEASES, keys.HELD_COUNTS, *(n for n, _ in lists), *wakes]
        self.sources = sources

    def next_prefix(self) -> str:
        with self._lock:
            self._count += 1
            return f"{self._prefix}{self._count:012d}:"


@dataclass
class FetchPlan:
    """One fetch: its script call, and how to read the reply."""

    command: tuple[Any, ...]
    lists: list[tuple[str, Source]]

    def parse(self, reply: Any) -> list[Fetched]:
        lists = self.lists
        return [
            Fetched(text(reply[i]), lists[int(reply[i + 1]) - 1][1], bytes(reply[i + 2]))
            for i in range(0, len(reply), 3)
        ]


def fetch_command(consumer: ConsumerState, room: int, lease_s: float) -> FetchPlan:
    """Take up to ``room`` messages from the consumer's sources, in priority order, each
    recorded as held in the same atomic step."""
    args = [room, lease_s, consumer.name, consumer.next_prefix(), *consumer._args]
    return FetchPlan(FETCH.command(consumer._keys, args), consumer._lists)


def fetch(execute: Execute, consumer: ConsumerState, room: int, lease_s: float) -> list[Fetched]:
    if room <= 0 or not consumer.sources:
        return []
    plan = fetch_command(consumer, room, lease_s)
    return plan.parse(execute([plan.command])[0])


def ack_command(consumer: ConsumerState, done: Sequence[tuple[str, str]]) -> tuple[Any, ...]:
    """Acknowledge (tag, label) pairs: they leave the held hash and the held counts."""
    return ACK.command([consumer.held_key, keys.HELD_COUNTS], [x for pair in done for x in pair])


def give_back_command(consumer: ConsumerState, tags: Sequence[str]) -> tuple[Any, ...]:
    """Held messages back to the head of their (shared) queues, unrun."""
    return RETURN.command([consumer.held_key, keys.HELD_COUNTS], [keys.WAKE_PREFIX, *tags])


def give_back(execute: Execute, consumer: ConsumerState, tags: Sequence[str]) -> int:
    return int(execute([give_back_command(consumer, tags)])[0]) if tags else 0


# KEYS: the result key, leases, the lists the message may wait in. ARGV: the message, held
# prefix. 1 if Redis has the request (answered, waiting or held), else 0.
_PRESENT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
for i = 3, #KEYS do
  if redis.call('LPOS', KEYS[i], ARGV[1]) then return 1 end
end
local n = #ARGV[1]
for _, holder in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  for _, held in ipairs(redis.call('HVALS', ARGV[2] .. holder)) do
    if string.sub(held, -n) == ARGV[1] then return 1 end
  end
end
return 0
"""


def presence_command(
    task_id: str, queue: str, shared_queue: str, message: bytes
) -> tuple[Any, ...]:
    """Whether Redis has a request whose publish was never acknowledged (its connection
    was lost): answered, waiting in its queue or its shared queue, or held by a worker.
    A scan, for the rare reconnect only."""
    lists = dict.fromkeys([*queue_lists(queue), *queue_lists(shared_queue)])
    keys_ = [result_key(task_id), keys.LEASES, *lists]
    return ("EVAL", _PRESENT, len(keys_), *keys_, message, keys.HELD_PREFIX)


def in_flight_done_command(key: str, field: str, n: int) -> tuple[Any, ...]:
    return IN_FLIGHT_DONE.command([key], [field, n])


def heartbeat_command(
    hostname: str, report: str, ttl_s: float, now: float, lease_s: float
) -> tuple[Any, ...]:
    """A worker's report, its place in the workers' set and its lease renewed."""
    return HEARTBEAT.command(
        [keys.worker_report_key(hostname), keys.WORKERS, keys.LEASES],
        [report, math.ceil(ttl_s), now, hostname, lease_s],
    )


def release(execute: Execute, consumer: str = "") -> int:
    """Give back what ``consumer`` held and what waits in its instance queues (a failover),
    or, with no consumer named, what every consumer whose lease expired held."""
    command = RELEASE.command(
        [keys.LEASES, keys.HELD_COUNTS, keys.INSTANCE_QUEUES],
        [
            keys.HELD_PREFIX,
            keys.WAKE_PREFIX,
            consumer,
            keys.INSTANCE_QUEUE_PREFIX,
            keys.QUEUE_PREFIX,
        ],
    )
    return int(execute([command])[0])


def sweep(client: redis.Redis, lease_s: float) -> int:
    """Give back what consumers whose lease expired held. Skipped while Redis has been up
    for less than a lease: live workers renew theirs within a report of reconnecting."""
    if float(client.info("server").get("uptime_in_seconds", 0)) < lease_s:
        return 0
    return release(functools.partial(run, client))


@dataclass
class Load:
    """Per "name/version": requests waiting in its queues, and held by workers."""

    queued: dict[str, int]
    held: dict[str, int]


def load_command() -> tuple[Any, ...]:
    suffixes = [f"{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS if step]
    return LOAD.command(
        [keys.REGISTRY_QUEUES, keys.PRIORITY_QUEUES, keys.INSTANCE_QUEUES, keys.HELD_COUNTS],
        suffixes,
    )


def parse_load(reply: Any) -> Load:
    queued_raw, held_raw = reply
    queued: dict[str, int] = {}
    for i in range(0, len(queued_raw), 2):
        label = keys.queue_label(text(queued_raw[i]))
        if label is not None:
            queued[label] = queued.get(label, 0) + int(queued_raw[i + 1])
    held = {
        text(held_raw[i]): int(held_raw[i + 1])
        for i in range(0, len(held_raw), 2)
        if int(held_raw[i + 1]) > 0
    }
    return Load(queued, held)


def wait_command(consumer: ConsumerState, own_wake: str, timeout_s: float) -> tuple[Any, ...]:
    """Block until a producer (or this worker) leaves a wake token, or ``timeout_s``."""
    return ("BRPOP", own_wake, *consumer._wait, timeout_s)
