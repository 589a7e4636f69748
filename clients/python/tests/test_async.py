"""The asyncio client against a real meterd."""

import asyncio

import pytest

from meterd import AsyncMeterd, MeterdError, uuid7


def test_async_client_round_trip(server):
    async def main():
        c = "c-" + uuid7()
        async with AsyncMeterd(server.url, server.api_key, batch_size=50, flush_interval=0.05) as m:
            assert (await m.check(c, "interviews"))["allowed"] is True
            held = await m.reserve(c, "interview_minutes", 30, expires_in=3600)
            settled = await m.settle(held["reservation"]["id"], 12.25)
            assert settled["status"] == "settled"
            await asyncio.gather(*(m.track({"customer": c, "meter": "tokens"}) for _ in range(120)))
            with pytest.raises(MeterdError) as e:
                await m.consume(c, "no_such_meter")
            assert e.value.code == "invalid_request"
            await m.flush()
            assert m.stats["accepted"] == 120
            usage = await m.customer_usage(c)
            assert next(r for r in usage["meters"] if r["meter"] == "interview_minutes")["used"] == 12.25
        assert server.total("tokens", c) == 120

    asyncio.run(main())
