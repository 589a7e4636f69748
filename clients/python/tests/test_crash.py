"""The key property (issue 21, point 4): meterd is SIGKILLed twice, once while
a batch is in flight and once right after it wrote a batch but before its
answer reached the client, and restarted on the same port and data dir; the client
keeps tracking from several threads, retries with the same ids, and after
close() meterd's total is exactly the number of events tracked."""

import random
import threading
import time

from harness import MeterdProcess

from meterd import Meterd, MeterdError, Retry


def test_sigkill_mid_batch_and_restart_total_is_exact():
    server = MeterdProcess()
    try:
        kills = []
        restarts = []

        def crash(delay):
            time.sleep(delay)
            server.kill()
            time.sleep(1)
            server.restart()

        class Killing(Meterd):
            requests = 0

            def _once(self, method, path, body):
                if path != "/v1/events":
                    return super()._once(method, path, body)
                Killing.requests += 1
                if Killing.requests == 8:
                    # The kill lands 0-4 ms after the request is sent: before
                    # or after meterd wrote the batch, the answer is lost.
                    kills.append(8)
                    t = threading.Thread(target=crash, args=(random.random() * 0.004,))
                    t.start()
                    restarts.append(t)
                if Killing.requests == 25:
                    # meterd writes the batch and answers, and is killed before
                    # the answer reaches the client: the retry must be a duplicate.
                    kills.append(25)
                    super()._once(method, path, body)
                    t = threading.Thread(target=crash, args=(0,))
                    t.start()
                    restarts.append(t)
                    raise MeterdError("meterd: the answer was lost", code="network_error")
                return super()._once(method, path, body)

        n = 20_000
        client = Killing(
            server.url,
            server.api_key,
            batch_size=400,
            flush_interval=0.05,
            max_buffer_size=n,
            batch_retry=Retry(max_attempts=30, base_delay=0.05, max_delay=0.5),
        )

        def produce(k):
            for i in range(n // 4):
                client.track({"customer": f"c{(i + k) % 13}", "meter": "tokens"})
                if i % 200 == 199:
                    time.sleep(0.002)

        producers = [threading.Thread(target=produce, args=(k,)) for k in range(4)]
        for p in producers:
            p.start()
        for p in producers:
            p.join()
        client.close()
        for t in restarts:
            t.join()
        assert kills == [8, 25], "meterd was killed twice mid-batch"
        stats = client.stats
        print("crash test stats", stats)
        assert stats["failed"] == 0 and stats["dropped"] == 0
        assert stats["retries"] >= 2
        assert stats["duplicates"] >= 400, "the batch whose answer was lost was re-sent and deduplicated"
        # Each event got exactly one answer: accepted, or (its first answer
        # lost with the kill) a duplicate of what meterd had already written.
        assert stats["accepted"] + stats["duplicates"] == n
        assert server.total("tokens") == n
        # And after another restart (the WAL replayed), nothing doubled.
        server.kill()
        server.restart()
        assert server.total("tokens") == n
    finally:
        server.stop()
