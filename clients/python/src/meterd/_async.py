"""The asyncio meterd client: the synchronous client's calls run in a worker
thread (``asyncio.to_thread``), and its background thread does the batching,
so ``track()`` never blocks the event loop (except, by choice, under
``on_full="block"``, where it awaits room)."""

from __future__ import annotations

import asyncio
from typing import Any, Dict, List, Optional

from ._client import Event, Meterd


class AsyncMeterd:
    """Same arguments and methods as :class:`Meterd`, as coroutines."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._sync = Meterd(*args, **kwargs)
        self._blocking_track = kwargs.get("on_full") == "block"

    async def __aenter__(self) -> "AsyncMeterd":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @property
    def stats(self) -> Dict[str, int]:
        return self._sync.stats

    @property
    def sync(self) -> Meterd:
        """The underlying synchronous client."""
        return self._sync

    async def track(self, event: Event) -> None:
        """Buffers one event (see :meth:`Meterd.track`)."""
        if self._blocking_track:
            await asyncio.to_thread(self._sync.track, event)
        else:
            self._sync.track(event)

    async def flush(self, timeout: Optional[float] = None) -> None:
        await asyncio.to_thread(self._sync.flush, timeout)

    async def close(self, timeout: Optional[float] = None) -> None:
        await asyncio.to_thread(self._sync.close, timeout)

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        return await asyncio.to_thread(self._sync.request, method, path, body)

    async def check(self, customer: str, meter: str, quantity: Optional[float] = None, **extra: Any) -> Dict[str, Any]:
        return await asyncio.to_thread(self._sync.check, customer, meter, quantity, **extra)

    async def consume(
        self, customer: str, meter: str, quantity: Optional[float] = None, *, id: Optional[str] = None, **extra: Any
    ) -> Dict[str, Any]:
        return await asyncio.to_thread(self._sync.consume, customer, meter, quantity, id=id, **extra)

    async def reserve(self, customer: str, meter: str, quantity: Optional[float] = None, **kw: Any) -> Dict[str, Any]:
        return await asyncio.to_thread(self._sync.reserve, customer, meter, quantity, **kw)

    async def settle(self, id: str, quantity: Optional[float] = None, **kw: Any) -> Dict[str, Any]:
        return await asyncio.to_thread(self._sync.settle, id, quantity, **kw)

    async def release(self, id: str) -> Dict[str, Any]:
        return await asyncio.to_thread(self._sync.release, id)

    async def reservation(self, id: str) -> Dict[str, Any]:
        return await asyncio.to_thread(self._sync.reservation, id)

    async def usage(self, meter: str, from_: Any, to: Any, **kw: Any) -> Dict[str, Any]:
        return await asyncio.to_thread(self._sync.usage, meter, from_, to, **kw)

    async def customer_usage(self, customer: str) -> Dict[str, Any]:
        return await asyncio.to_thread(self._sync.customer_usage, customer)

    async def balances(self, customer: str) -> Dict[str, Any]:
        return await asyncio.to_thread(self._sync.balances, customer)

    async def grants(self, customer: str, meter: Optional[str] = None) -> List[Dict[str, Any]]:
        return await asyncio.to_thread(self._sync.grants, customer, meter)

    async def create_grant(self, customer: str, meter: str, amount: float, **kw: Any) -> Dict[str, Any]:
        return await asyncio.to_thread(self._sync.create_grant, customer, meter, amount, **kw)

    async def void_grant(self, customer: str, id: str) -> Dict[str, Any]:
        return await asyncio.to_thread(self._sync.void_grant, customer, id)

    async def entitlements(self, customer: str) -> Dict[str, Any]:
        return await asyncio.to_thread(self._sync.entitlements, customer)

    async def set_entitlements(self, customer: str, doc: Dict[str, Any]) -> Dict[str, Any]:
        return await asyncio.to_thread(self._sync.set_entitlements, customer, doc)

    async def ingest(self, events: List[Event]) -> Dict[str, Any]:
        return await asyncio.to_thread(self._sync.ingest, events)
