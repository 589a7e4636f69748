"""The synchronous meterd client (standard library only).

Direct calls (check, consume, reservations, usage, balances, grants,
entitlements) go out at once over ``urllib``; :meth:`Meterd.track` buffers
events and a background thread sends them in batches, retrying with the same
ids so that a retry is deduplicated by meterd and never counted twice.
"""

from __future__ import annotations

import atexit
import collections
import email.utils
import http.client
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple, Union

from ._errors import RETRY_STATUSES, BufferFullError, MeterdError
from ._uuid import uuid7

Event = Dict[str, Any]
Time = Union[datetime, str, int, float]

ON_FULL = ("drop-oldest", "block", "raise")


@dataclass(frozen=True)
class Retry:
    """Retries of 408/429/502/503/504 and network errors: exponential backoff
    with jitter (half fixed, half random), or the server's ``Retry-After``
    when it is longer (honoured up to 60 s)."""

    max_attempts: int = 3
    base_delay: float = 0.1
    max_delay: float = 10.0

    def delay(self, attempt: int, retry_after: Optional[float]) -> float:
        """The wait before retry number ``attempt`` (1-based)."""
        cap = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        jittered = cap / 2 + random.random() * cap / 2
        if retry_after is not None and retry_after > jittered:
            return min(retry_after, 60.0)
        return jittered


#: Background batches and ``ingest()``: about a minute of retries.
BATCH_RETRY = Retry(max_attempts=12)


def _time(t: Optional[Time]) -> Any:
    if isinstance(t, datetime):
        if t.tzinfo is None:
            raise MeterdError("meterd: a datetime must carry a timezone", code="invalid_request")
        return t.isoformat()
    return t


def _retry_after(value: Optional[str]) -> Optional[float]:
    if value is None:
        return None
    try:
        secs = float(value)
        return secs if secs >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _seg(s: str) -> str:
    return urllib.parse.quote(s, safe="")


def _bad_event(field: str, reason: str) -> MeterdError:
    return MeterdError(
        f"meterd: {field}: {reason}", code="invalid_event", details=[{"index": 0, "field": field, "reason": reason}]
    )


def normalize(event: Event) -> Event:
    """The event as it will be sent: ``id`` (UUIDv7) and ``timestamp`` (now,
    Unix ms) filled in when absent, so that every retry carries the same ones."""
    if not isinstance(event, dict):
        raise _bad_event("event", "must be a dict")
    if not isinstance(event.get("customer"), str) or not event["customer"]:
        raise _bad_event("customer", "must be a non-empty string")
    if not isinstance(event.get("meter"), str) or not event["meter"]:
        raise _bad_event("meter", "must be a non-empty string")
    q = event.get("quantity")
    if q is not None and (isinstance(q, bool) or not isinstance(q, (int, float)) or q != q or q < 0 or q == float("inf")):
        raise _bad_event("quantity", "must be a finite number, not negative")
    out = dict(event)
    if out.get("id") is None:
        out["id"] = uuid7()
    ts = out.get("timestamp")
    out["timestamp"] = time.time_ns() // 1_000_000 if ts is None else _time(ts)
    return out


class _Entry:
    __slots__ = ("seq", "event", "at")

    def __init__(self, seq: int, event: Event, at: float) -> None:
        self.seq = seq
        self.event = event
        self.at = at


class Meterd:
    """A meterd client. One per process is enough; thread-safe.

    ``on_full`` says what :meth:`track` does when ``max_buffer_size`` events
    are waiting: ``"drop-oldest"`` (default) drops the oldest waiting event
    (``on_drop``, ``stats["dropped"]``); ``"block"`` waits for room;
    ``"raise"`` raises :class:`BufferFullError`.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8480",
        api_key: Optional[str] = None,
        *,
        timeout: float = 10.0,
        retry: Retry = Retry(),
        batch_retry: Retry = BATCH_RETRY,
        batch_size: int = 1000,
        flush_interval: float = 1.0,
        max_buffer_size: int = 100_000,
        on_full: str = "drop-oldest",
        on_error: Optional[Callable[[MeterdError, List[Event]], None]] = None,
        on_drop: Optional[Callable[[List[Event]], None]] = None,
    ) -> None:
        if not (isinstance(batch_size, int) and 1 <= batch_size <= 10_000):
            raise ValueError("meterd: batch_size must be an integer from 1 to 10000")
        if not (isinstance(max_buffer_size, int) and max_buffer_size >= 1):
            raise ValueError("meterd: max_buffer_size must be a positive integer")
        if on_full not in ON_FULL:
            raise ValueError(f"meterd: on_full must be one of {', '.join(ON_FULL)}")
        self._base = base_url.rstrip("/")
        self._api_key = api_key
        self._timeout = timeout
        self._retry = retry
        self._batch_retry = batch_retry
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._max_buffer = max_buffer_size
        self._on_full = on_full
        self._on_error = on_error
        self._on_drop = on_drop

        self._cond = threading.Condition()
        self._buffer: Deque[_Entry] = collections.deque()
        self._in_flight: List[_Entry] = []
        self._seq = 0
        self._drain_upto = 0
        self._closed = False
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self._failures: List[Tuple[int, MeterdError]] = []
        self._stats = {"tracked": 0, "accepted": 0, "duplicates": 0, "failed": 0, "dropped": 0, "batches": 0, "retries": 0}
        atexit.register(_close_at_exit, weakref.ref(self))

    def __enter__(self) -> "Meterd":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def stats(self) -> Dict[str, int]:
        """Counters since the client was made (a copy)."""
        with self._cond:
            return {**self._stats, "buffered": len(self._buffer), "in_flight": len(self._in_flight)}

    # ------------------------------------------------------------------
    # Direct calls

    def request(self, method: str, path: str, body: Any = None, retry: Optional[Retry] = None) -> Any:
        """One API call with retries; the parsed JSON answer."""
        retry = retry or self._retry
        attempt = 1
        while True:
            try:
                return self._once(method, path, body)
            except MeterdError as e:
                if not e.retryable or attempt >= retry.max_attempts:
                    raise
                with self._cond:
                    self._stats["retries"] += 1
                time.sleep(retry.delay(attempt, e.retry_after))
                attempt += 1

    def _once(self, method: str, path: str, body: Any) -> Any:
        headers = {"accept": "application/json"}
        if self._api_key:
            headers["authorization"] = f"Bearer {self._api_key}"
        data = None
        if body is not None:
            headers["content-type"] = "application/json"
            data = json.dumps(body, separators=(",", ":")).encode("utf-8")
        req = urllib.request.Request(self._base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self._timeout) as res:
                text = res.read()
                return json.loads(text) if text else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                err = json.loads(raw).get("error") or {}
            except (ValueError, AttributeError):
                err = {}
            code = err.get("code") or ("unavailable" if e.code in RETRY_STATUSES else "http_error")
            raise MeterdError(
                err.get("message") or f"meterd: {method} {path}: HTTP {e.code}",
                status=e.code,
                code=code,
                details=err.get("details"),
                retry_after=_retry_after(e.headers.get("retry-after")),
            ) from None
        except (socket.timeout, TimeoutError) as e:
            raise MeterdError(f"meterd: {method} {path} timed out after {self._timeout} s", code="timeout") from e
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
            # ValueError, HTTPException: a broken answer (bad JSON, a cut body).
            reason = getattr(e, "reason", e)
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise MeterdError(f"meterd: {method} {path} timed out after {self._timeout} s", code="timeout") from e
            raise MeterdError(f"meterd: {method} {path}: {reason}", code="network_error") from e

    def check(self, customer: str, meter: str, quantity: Optional[float] = None, **extra: Any) -> Dict[str, Any]:
        """Whether ``customer`` may use ``quantity`` more of ``meter``; records nothing
        (use :meth:`consume` to record in the same step)."""
        body: Dict[str, Any] = {"customer": customer, "meter": meter, **extra}
        if quantity is not None:
            body["quantity"] = quantity
        return self.request("POST", "/v1/check", body)

    def consume(
        self, customer: str, meter: str, quantity: Optional[float] = None, *, id: Optional[str] = None, **extra: Any
    ) -> Dict[str, Any]:
        """Check and record in one step: allowed → recorded as an event with
        ``id`` (a new UUIDv7 when absent; retries of this call reuse it)."""
        return self.check(customer, meter, quantity, consume=True, id=id or uuid7(), **extra)

    def reserve(
        self,
        customer: str,
        meter: str,
        quantity: Optional[float] = None,
        *,
        id: Optional[str] = None,
        expires_in: Union[str, int, float, None] = None,
    ) -> Dict[str, Any]:
        """Holds ``quantity`` against the limits until settled, released or
        expired (``expires_in``: ``"2h"`` or seconds; absent: until released)."""
        body: Dict[str, Any] = {"id": id or uuid7(), "customer": customer, "meter": meter}
        if quantity is not None:
            body["quantity"] = quantity
        if expires_in is not None:
            body["expires_in"] = f"{int(expires_in)}s" if isinstance(expires_in, (int, float)) else expires_in
        return self.request("POST", "/v1/reservations", body)

    def settle(self, id: str, quantity: Optional[float] = None, *, timestamp: Optional[Time] = None) -> Dict[str, Any]:
        """Records the actual quantity (default: the quantity held) and releases
        the hold; the reservation."""
        body: Dict[str, Any] = {}
        if quantity is not None:
            body["quantity"] = quantity
        if timestamp is not None:
            body["timestamp"] = _time(timestamp)
        return self.request("POST", f"/v1/reservations/{_seg(id)}/settle", body)["reservation"]

    def release(self, id: str) -> Dict[str, Any]:
        """Releases a hold without recording usage; the reservation."""
        return self.request("POST", f"/v1/reservations/{_seg(id)}/release", {})["reservation"]

    def reservation(self, id: str) -> Dict[str, Any]:
        return self.request("GET", f"/v1/reservations/{_seg(id)}")["reservation"]

    def usage(
        self,
        meter: str,
        from_: Time,
        to: Time,
        *,
        granularity: Optional[str] = None,
        customer: Optional[str] = None,
        group_by: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Usage over time (``GET /v1/usage``)."""
        q = {"meter": meter, "from": str(_time(from_)), "to": str(_time(to))}
        if granularity:
            q["granularity"] = granularity
        if customer is not None:
            q["customer"] = customer
        if group_by is not None:
            q["group_by"] = group_by
        return self.request("GET", "/v1/usage?" + urllib.parse.urlencode(q))

    def customer_usage(self, customer: str) -> Dict[str, Any]:
        """A customer's limits, usage and features (``GET /v1/customers/{c}/usage``)."""
        return self.request("GET", f"/v1/customers/{_seg(customer)}/usage")

    def balances(self, customer: str) -> Dict[str, Any]:
        return self.request("GET", f"/v1/customers/{_seg(customer)}/balances")

    def grants(self, customer: str, meter: Optional[str] = None) -> List[Dict[str, Any]]:
        q = "" if meter is None else "?meter=" + _seg(meter)
        return self.request("GET", f"/v1/customers/{_seg(customer)}/grants{q}")["grants"]

    def create_grant(
        self,
        customer: str,
        meter: str,
        amount: float,
        *,
        id: Optional[str] = None,
        priority: Optional[int] = None,
        effective_at: Optional[Time] = None,
        expires_at: Optional[Time] = None,
        reason: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Grants credits (scope ``admin``); the same ``id`` again changes nothing."""
        body: Dict[str, Any] = {"id": id or uuid7(), "meter": meter, "amount": amount}
        for k, v in (("priority", priority), ("effective_at", _time(effective_at)), ("expires_at", _time(expires_at)), ("reason", reason)):
            if v is not None:
                body[k] = v
        return self.request("POST", f"/v1/customers/{_seg(customer)}/grants", body)

    def void_grant(self, customer: str, id: str) -> Dict[str, Any]:
        """Voids the unspent remainder of a grant (scope ``admin``)."""
        return self.request("DELETE", f"/v1/customers/{_seg(customer)}/grants/{_seg(id)}")

    def entitlements(self, customer: str) -> Dict[str, Any]:
        return self.request("GET", f"/v1/customers/{_seg(customer)}/entitlements")

    def set_entitlements(self, customer: str, doc: Dict[str, Any]) -> Dict[str, Any]:
        """Replaces a customer's entitlements (scope ``admin``)."""
        return self.request("PUT", f"/v1/customers/{_seg(customer)}/entitlements", doc)

    def ingest(self, events: List[Event]) -> Dict[str, Any]:
        """Sends events now (not buffered), with ids and timestamps filled in,
        retried like the background batches: ``{"accepted", "duplicates"}``."""
        return self.request("POST", "/v1/events", [normalize(e) for e in events], self._batch_retry)

    # ------------------------------------------------------------------
    # Background batching

    def track(self, event: Event) -> None:
        """Buffers one event for the background thread, which sends when
        ``batch_size`` events wait or ``flush_interval`` after the oldest. The
        id (UUIDv7) and timestamp are set now when absent, so every retry is
        the same event. Raises :class:`MeterdError` (``invalid_event``) at once
        for an event without customer or meter or with a bad quantity."""
        ev = normalize(event)
        dropped: Optional[Event] = None
        with self._cond:
            if self._closed:
                raise MeterdError("meterd: track() after close()", code="closed")
            if len(self._buffer) >= self._max_buffer:
                if self._on_full == "raise":
                    raise BufferFullError(self._max_buffer)
                if self._on_full == "block":
                    self._drain_upto = max(self._drain_upto, self._seq)
                    self._cond.notify_all()
                    while len(self._buffer) >= self._max_buffer and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        raise MeterdError("meterd: track() after close()", code="closed")
                else:
                    dropped = self._buffer.popleft().event
                    self._stats["dropped"] += 1
            self._seq += 1
            self._stats["tracked"] += 1
            self._buffer.append(_Entry(self._seq, ev, time.monotonic()))
            self._ensure_thread()
            if len(self._buffer) == 1 or len(self._buffer) >= self._batch_size:
                self._cond.notify_all()
        if dropped is not None and self._on_drop is not None:
            self._call(self._on_drop, [dropped])

    def flush(self, timeout: Optional[float] = None) -> None:
        """Sends every event tracked before this call; returns when each is
        acknowledged, or raises the first :class:`MeterdError` of those that
        could not be sent (each also went to ``on_error``), or ``TimeoutError``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            upto = self._seq
            self._drain_upto = max(self._drain_upto, upto)
            self._cond.notify_all()
            while self._pending_min() <= upto:
                if self._thread is None or not self._thread.is_alive():
                    self._ensure_thread()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"meterd: flush() timed out with {len(self._buffer) + len(self._in_flight)} events unsent")
                self._cond.wait(left)
            failed = [f for f in self._failures if f[0] <= upto]
            self._failures = [f for f in self._failures if f[0] > upto]
        if failed:
            raise failed[0][1]

    def close(self, timeout: Optional[float] = None) -> None:
        """Flushes and stops the background thread; ``track()`` raises afterwards."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        try:
            self.flush(timeout)
        finally:
            with self._cond:
                self._stop = True
                self._cond.notify_all()
                thread = self._thread
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout)

    def _pending_min(self) -> float:
        candidates = [math_inf]
        if self._in_flight:
            candidates.append(self._in_flight[0].seq)
        if self._buffer:
            candidates.append(self._buffer[0].seq)
        return min(candidates)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="meterd-batcher", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._buffer:
                        head = self._buffer[0]
                        if len(self._buffer) >= self._batch_size or head.seq <= self._drain_upto:
                            break
                        wait = head.at + self._flush_interval - time.monotonic()
                        if wait <= 0:
                            break
                        self._cond.wait(wait)
                    elif self._stop:
                        return
                    else:
                        self._cond.wait()
                n = min(self._batch_size, len(self._buffer))
                batch = [self._buffer.popleft() for _ in range(n)]
                self._in_flight = batch
                self._cond.notify_all()  # room for blocked track() calls
            self._send(batch)
            with self._cond:
                self._in_flight = []
                self._cond.notify_all()

    def _send(self, batch: List[_Entry]) -> None:
        """Sends one batch until acknowledged or failed for good. Invalid events
        (a 400 ``invalid_event`` names them) are dropped and the rest re-sent; a
        batch over the server's size limit (413) is sent in halves."""
        if not batch:
            return
        try:
            r = self.request("POST", "/v1/events", [e.event for e in batch], self._batch_retry) or {}
            with self._cond:
                self._stats["batches"] += 1
                self._stats["accepted"] += int(r.get("accepted", 0))
                self._stats["duplicates"] += int(r.get("duplicates", 0))
        except MeterdError as e:
            if e.code == "invalid_event" and isinstance(e.details, list):
                bad = {d.get("index") for d in e.details if isinstance(d, dict) and isinstance(d.get("index"), int)}
                if bad:
                    self._fail(e, [x for i, x in enumerate(batch) if i in bad])
                    self._send([x for i, x in enumerate(batch) if i not in bad])
                    return
            if e.status == 413 and len(batch) > 1:
                half = (len(batch) + 1) // 2
                self._send(batch[:half])
                self._send(batch[half:])
                return
            self._fail(e, batch)
        except Exception as e:  # a bug must not kill the sender and lose the buffer
            self._fail(MeterdError(f"meterd: {e!r}"), batch)

    def _fail(self, error: MeterdError, entries: List[_Entry]) -> None:
        if not entries:
            return
        with self._cond:
            self._stats["failed"] += len(entries)
            self._failures.append((entries[0].seq, error))
        if self._on_error is not None:
            self._call(self._on_error, error, [e.event for e in entries])

    @staticmethod
    def _call(fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # a throwing handler must not stop the sender
            pass


math_inf = float("inf")


def _close_at_exit(ref: "weakref.ref[Meterd]") -> None:
    client = ref()
    if client is not None and not client._closed:
        try:
            client.close(timeout=10)
        except Exception:
            pass


__all__ = ["Meterd", "Retry", "normalize", "BATCH_RETRY"]
