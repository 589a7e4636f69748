"""Verifying meterd's notifications (Standard Webhooks).

``webhook-signature`` is ``v1,`` + base64 HMAC-SHA256 of
``"{webhook-id}.{webhook-timestamp}.{body}"`` under the endpoint's key (the
secret is ``whsec_`` + base64 of the key). Signatures are compared in constant
time, and the timestamp must be within the tolerance (default 5 minutes).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from datetime import datetime
from typing import Any, Mapping, Optional, Union

from ._errors import WebhookVerificationError

Payload = Union[str, bytes]


def _header(headers: Mapping[str, Any], name: str) -> Optional[str]:
    getter = getattr(headers, "get", None)
    value = getter(name) if getter is not None else None
    if value is None:
        for k, v in headers.items():
            if k.lower() == name:
                value = v
                break
    if isinstance(value, (list, tuple)):
        value = " ".join(value)
    return value


def _bytes(payload: Payload) -> bytes:
    return payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)


class Webhook:
    """Verifies (and makes) Standard Webhooks signatures for one endpoint secret."""

    def __init__(self, secret: Union[str, bytes]) -> None:
        if isinstance(secret, str):
            text = secret[len("whsec_") :] if secret.startswith("whsec_") else secret
            try:
                key = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError) as e:
                raise WebhookVerificationError("the webhook secret is not base64") from e
        else:
            key = bytes(secret)
        if not key:
            raise WebhookVerificationError("the webhook secret is empty")
        self._key = key

    def sign(self, msg_id: str, timestamp: Union[datetime, int, float], payload: Payload) -> str:
        """The ``webhook-signature`` value (``v1,<base64>``) of a message."""
        ts = int(timestamp.timestamp()) if isinstance(timestamp, datetime) else int(timestamp)
        mac = hmac.new(self._key, f"{msg_id}.{ts}.".encode() + _bytes(payload), hashlib.sha256).digest()
        return "v1," + base64.b64encode(mac).decode("ascii")

    def verify(
        self,
        payload: Payload,
        headers: Mapping[str, Any],
        *,
        tolerance: float = 300,
        now: Optional[float] = None,
    ) -> Any:
        """Checks the headers against the raw body (exactly as received) and
        returns the parsed JSON payload; raises :class:`WebhookVerificationError`."""
        msg_id = _header(headers, "webhook-id")
        ts_text = _header(headers, "webhook-timestamp")
        sigs = _header(headers, "webhook-signature")
        if not msg_id or not ts_text or not sigs:
            raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
        if not (ts_text.isascii() and ts_text.isdigit() and len(ts_text) <= 15):
            raise WebhookVerificationError("webhook-timestamp is not Unix seconds")
        ts = int(ts_text)
        current = int(time.time() if now is None else now)
        if ts < current - tolerance:
            raise WebhookVerificationError("message timestamp too old")
        if ts > current + tolerance:
            raise WebhookVerificationError("message timestamp too new")
        body = _bytes(payload)
        expected = hmac.new(self._key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
        for part in sigs.split(" "):
            version, _, sig = part.partition(",")
            if version != "v1":
                continue
            try:
                mac = base64.b64decode(sig, validate=True)
            except (binascii.Error, ValueError):
                continue
            if hmac.compare_digest(mac, expected):
                try:
                    return json.loads(body)
                except ValueError as e:
                    raise WebhookVerificationError("the payload is not JSON") from e
        raise WebhookVerificationError("no matching signature")


def verify_webhook(secret: Union[str, bytes], payload: Payload, headers: Mapping[str, Any], **kw: Any) -> Any:
    """One-call form of :meth:`Webhook.verify`."""
    return Webhook(secret).verify(payload, headers, **kw)
