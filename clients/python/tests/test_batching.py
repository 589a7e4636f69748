"""track(): batching by size and time, flush on close, the buffer-full
policies, invalid events in a batch, Retry-After, against a real meterd."""

import json
import threading
import time

import pytest

from meterd import BufferFullError, Meterd, MeterdError, uuid7


class Gated(Meterd):
    """Records each events batch's size; its sends can be held shut."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.sizes = []
        self.times = []
        self.gate = threading.Event()
        self.gate.set()

    def _once(self, method, path, body):
        if path == "/v1/events":
            self.sizes.append(len(body))
            self.times.append(time.monotonic())
            self.gate.wait()
        return super()._once(method, path, body)


def new_customer():
    return "c-" + uuid7()


def test_sends_by_size_then_by_time(server):
    client = Gated(server.url, server.api_key, batch_size=100, flush_interval=0.3)
    c = new_customer()
    start = time.monotonic()
    for _ in range(250):
        client.track({"customer": c, "meter": "tokens", "quantity": 2})
    deadline = time.monotonic() + 10
    while len(client.sizes) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    # Two full batches at once; the 50 left waited for the interval.
    assert client.sizes == [100, 100, 50]
    assert client.times[2] - start >= 0.29, f"the partial batch went after {client.times[2] - start:.3f} s"
    client.flush()
    assert server.total("tokens", c) == 500
    assert client.stats["accepted"] == 250
    client.close()


def test_close_flushes_and_track_after_close_raises(server):
    client = Meterd(server.url, server.api_key, flush_interval=60)
    c = new_customer()
    for _ in range(10):
        client.track({"customer": c, "meter": "tokens"})
    assert client.stats["buffered"] == 10
    client.close()
    assert client.stats["buffered"] == 0
    assert server.total("tokens", c) == 10
    with pytest.raises(MeterdError) as e:
        client.track({"customer": c, "meter": "tokens"})
    assert e.value.code == "closed"


def test_context_manager_flushes(server):
    c = new_customer()
    with Meterd(server.url, server.api_key, flush_interval=60) as client:
        client.track({"customer": c, "meter": "tokens", "quantity": 7})
    assert server.total("tokens", c) == 7


def test_a_given_id_counts_once(server):
    client = Meterd(server.url, server.api_key)
    c = new_customer()
    eid = "e-" + uuid7()
    client.track({"id": eid, "customer": c, "meter": "tokens", "quantity": 5})
    client.flush()
    client.track({"id": eid, "customer": c, "meter": "tokens", "quantity": 5})
    client.close()
    assert (client.stats["accepted"], client.stats["duplicates"]) == (1, 1)
    assert server.total("tokens", c) == 5


def test_invalid_event_reported_rest_counted(server):
    errors = []
    client = Meterd(server.url, server.api_key, on_error=lambda e, evs: errors.append((e, evs)))
    c = new_customer()
    client.track({"customer": c, "meter": "tokens"})
    client.track({"customer": c, "meter": "no_such_meter"})
    client.track({"customer": c, "meter": "tokens"})
    with pytest.raises(MeterdError) as e:
        client.flush()
    assert e.value.code == "invalid_event"
    assert len(errors) == 1 and [ev["meter"] for ev in errors[0][1]] == ["no_such_meter"]
    assert client.stats["failed"] == 1
    assert server.total("tokens", c) == 2
    client.close()


def fill(client, c, first_batch=5, then=10):
    client.gate.clear()
    for i in range(first_batch):
        client.track({"customer": c, "meter": "tokens", "quantity": i + 1, "id": f"{c}-{i + 1}"})
    deadline = time.monotonic() + 5
    while client.stats["in_flight"] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert client.stats["in_flight"] == first_batch


def test_on_full_drop_oldest(server):
    dropped = []
    client = Gated(server.url, server.api_key, batch_size=5, max_buffer_size=10, on_drop=dropped.extend)
    c = new_customer()
    fill(client, c)
    for i in range(6, 19):
        client.track({"customer": c, "meter": "tokens", "quantity": 1, "id": f"{c}-{i}"})
    assert [e["id"] for e in dropped] == [f"{c}-{i}" for i in (6, 7, 8)]
    assert client.stats["dropped"] == 3
    client.gate.set()
    client.close()
    assert server.total("tokens", c) == 15 + 10


def test_on_full_raise(server):
    client = Gated(server.url, server.api_key, batch_size=5, max_buffer_size=10, on_full="raise")
    c = new_customer()
    fill(client, c)
    for _ in range(10):
        client.track({"customer": c, "meter": "tokens"})
    with pytest.raises(BufferFullError) as e:
        client.track({"customer": c, "meter": "tokens"})
    assert e.value.code == "buffer_full"
    assert client.stats["tracked"] == 15
    client.gate.set()
    client.close()
    assert server.total("tokens", c) == 15 + 10


def test_on_full_block(server):
    client = Gated(server.url, server.api_key, batch_size=5, max_buffer_size=10, on_full="block")
    c = new_customer()
    fill(client, c)
    for _ in range(10):
        client.track({"customer": c, "meter": "tokens"})
    done = threading.Event()
    t = threading.Thread(target=lambda: (client.track({"customer": c, "meter": "tokens"}), done.set()))
    t.start()
    time.sleep(0.1)
    assert not done.is_set(), "track() waits while the buffer is full"
    client.gate.set()
    t.join(5)
    assert done.is_set()
    client.close()
    assert server.total("tokens", c) == 15 + 11
    assert client.stats["dropped"] == 0


def test_a_real_429_with_retry_after_is_honoured_with_the_same_batch(server):
    # The "limited" key allows one request a second: the second is a 429 with Retry-After.
    class Recording(Meterd):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.sent = []

        def _once(self, method, path, body):
            if path != "/v1/events":
                return super()._once(method, path, body)
            at = time.monotonic()
            try:
                r = super()._once(method, path, body)
                self.sent.append((json.dumps(body), at, 202))
                return r
            except MeterdError as e:
                self.sent.append((json.dumps(body), at, e.status))
                raise

    client = Recording(server.url, server.limited_key, flush_interval=0.01)
    c = new_customer()
    client.ingest([{"customer": c, "meter": "tokens", "quantity": 1}])
    client.track({"customer": c, "meter": "tokens", "quantity": 3})
    client.close()
    assert [s[2] for s in client.sent] == [202, 429, 202]
    assert client.sent[1][0] == client.sent[2][0], "the retry is byte for byte the same batch"
    assert client.sent[2][1] - client.sent[1][1] >= 0.9
    assert client.stats["retries"] == 1
    assert server.total("tokens", c) == 4


def test_normalize_fills_a_uuid7_and_a_timestamp_and_keeps_given_ones():
    import re
    from datetime import datetime, timezone

    from meterd import normalize

    before = time.time_ns() // 1_000_000
    a = normalize({"customer": "c", "meter": "tokens"})
    b = normalize({"customer": "c", "meter": "tokens"})
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", a["id"])
    assert a["id"] != b["id"]
    assert before <= a["timestamp"] <= time.time_ns() // 1_000_000
    at = datetime(2026, 11, 20, 10, tzinfo=timezone.utc)
    given = {"id": "x", "customer": "c", "meter": "m", "quantity": 2, "timestamp": at, "properties": {"k": "v"}}
    assert normalize(given) == {**given, "timestamp": "2026-11-20T10:00:00+00:00"}
    with pytest.raises(MeterdError):
        normalize({"customer": "c", "meter": "m", "timestamp": datetime(2026, 11, 20)})
