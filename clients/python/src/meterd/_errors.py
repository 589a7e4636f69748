"""Errors of the meterd client.

Every failed API call raises :class:`MeterdError` carrying the API's ``code``
and ``details`` (``{"error": {"code", "message", "details"}}``); transport
failures have status 0 and the codes ``network_error`` or ``timeout``.
"""

from __future__ import annotations

from typing import Any, Optional

#: Statuses that are retried: the same request may succeed later.
RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})


class MeterdError(Exception):
    """An error answered by meterd, or a failure to reach it."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        code: str = "unknown",
        details: Any = None,
        retry_after: Optional[float] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        #: HTTP status; 0 when no answer was received.
        self.status = status
        #: The API's code (``invalid_event``, ``rate_limited``, ...), or
        #: ``network_error``, ``timeout``, ``buffer_full``, ``closed``.
        self.code = code
        #: The API's ``details`` (for ``invalid_event``: ``[{index, field, reason}]``).
        self.details = details
        #: Seconds from a ``Retry-After`` header, if any.
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed later (429, 503, network)."""
        if self.status == 0:
            return self.code in ("network_error", "timeout")
        return self.status in RETRY_STATUSES

    def __repr__(self) -> str:
        return f"MeterdError(status={self.status}, code={self.code!r}, message={self.message!r})"


class BufferFullError(MeterdError):
    """``track()`` found the buffer full under ``on_full="raise"``."""

    def __init__(self, size: int) -> None:
        super().__init__(f"the event buffer is full ({size} events)", code="buffer_full")


class WebhookVerificationError(Exception):
    """A webhook whose signature or timestamp does not verify."""
