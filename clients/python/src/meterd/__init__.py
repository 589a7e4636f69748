"""meterd: a client for the meterd usage-metering daemon (standard library only).

:class:`Meterd` (synchronous, thread-safe, a background thread batching
``track()``), :class:`AsyncMeterd` (asyncio), typed errors, and
:class:`Webhook` to verify meterd's Standard Webhooks notifications.
"""

from ._async import AsyncMeterd
from ._client import BATCH_RETRY, Meterd, Retry, normalize
from ._errors import BufferFullError, MeterdError, WebhookVerificationError
from ._uuid import uuid7
from .webhooks import Webhook, verify_webhook

__version__ = "0.1.0"

__all__ = [
    "AsyncMeterd",
    "BATCH_RETRY",
    "BufferFullError",
    "Meterd",
    "MeterdError",
    "Retry",
    "Webhook",
    "WebhookVerificationError",
    "normalize",
    "uuid7",
    "verify_webhook",
]
