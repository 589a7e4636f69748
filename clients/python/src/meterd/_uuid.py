"""UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then random bits."""

from __future__ import annotations

import os
import time
import uuid


def uuid7() -> str:
    """A new UUIDv7 string."""
    ms = time.time_ns() // 1_000_000
    b = bytearray(ms.to_bytes(6, "big") + os.urandom(10))
    b[6] = (b[6] & 0x0F) | 0x70
    b[8] = (b[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(b)))
