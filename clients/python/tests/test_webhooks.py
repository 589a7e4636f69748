"""The webhook verifier against the reference implementation (the PyPI
``standardwebhooks`` package) both ways, and against a real delivery from meterd."""

import base64
import json
import os
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from harness import MeterdProcess
from standardwebhooks.webhooks import Webhook as Reference

from meterd import Meterd, Webhook, WebhookVerificationError, verify_webhook

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
BODY = json.dumps({"type": "limit.threshold", "data": {"customer": "u_42", "used": 271.5, "note": "ünïcode ✓"}})


def test_the_specification_example():
    wh = Webhook("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    headers = {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }
    assert wh.verify('{"test": 2432232314}', headers, now=1614265330) == {"test": 2432232314}
    assert wh.sign(headers["webhook-id"], 1614265330, '{"test": 2432232314}') == headers["webhook-signature"]


def test_signed_by_the_reference_verified_by_ours():
    at = datetime.now(timezone.utc)
    sig = Reference(SECRET).sign("msg_1", at, BODY)
    headers = {"Webhook-Id": "msg_1", "Webhook-Timestamp": str(int(at.timestamp())), "Webhook-Signature": sig}
    assert Webhook(SECRET).verify(BODY, headers) == json.loads(BODY)
    # Several signatures (a key rotation): any match verifies.
    headers["Webhook-Signature"] = "v1," + base64.b64encode(os.urandom(32)).decode() + " " + sig
    assert verify_webhook(SECRET, BODY.encode(), headers) == json.loads(BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(BODY + " ", headers)
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(os.urandom(32)).decode()).verify(BODY, headers)
    headers["Webhook-Id"] = "msg_2"
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        Webhook(SECRET).verify(BODY, headers)


def test_signed_by_ours_verified_by_the_reference():
    ts = int(time.time())
    sig = Webhook(SECRET).sign("msg_3", ts, BODY)
    headers = {"webhook-id": "msg_3", "webhook-timestamp": str(ts), "webhook-signature": sig}
    assert Reference(SECRET).verify(BODY, headers) == json.loads(BODY)
    assert sig == Reference(SECRET).sign("msg_3", datetime.fromtimestamp(ts, timezone.utc), BODY)


@pytest.mark.parametrize("offset,ok", [(-299, True), (299, True), (-301, False), (301, False)])
def test_the_timestamp_must_be_within_5_minutes(offset, ok):
    ts = int(time.time()) + offset
    wh = Webhook(SECRET)
    headers = {"webhook-id": "msg_t", "webhook-timestamp": str(ts), "webhook-signature": wh.sign("msg_t", ts, BODY)}
    if ok:
        assert wh.verify(BODY, headers) == json.loads(BODY)
        Reference(SECRET).verify(BODY, headers)
    else:
        with pytest.raises(WebhookVerificationError, match="timestamp too"):
            wh.verify(BODY, headers)
        with pytest.raises(Exception):
            Reference(SECRET).verify(BODY, headers)


def test_missing_or_bad_headers():
    with pytest.raises(WebhookVerificationError, match="missing"):
        Webhook(SECRET).verify(BODY, {})
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(BODY, {"webhook-id": "x", "webhook-timestamp": "soon", "webhook-signature": "v1,x"})


def test_a_real_notification_from_meterd_verifies():
    received = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["content-length"]))
            received.append((dict(self.headers.items()), body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    hook = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    server = None
    try:
        server = MeterdProcess(
            extra=f'\n[notifications]\nthresholds = [100]\n\n[[notifications.endpoints]]\nname = "app"\n'
            f'url = "http://127.0.0.1:{hook.server_address[1]}/hook"\nsecret_env = "METERD_PY_WEBHOOK_SECRET"\n',
            env={"METERD_PY_WEBHOOK_SECRET": SECRET},
        )
        client = Meterd(server.url, server.api_key)
        for _ in range(3):
            client.consume("u_hook", "interviews")
        deadline = time.monotonic() + 20
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        assert received, "meterd delivered the 100% notification"
        headers, raw = received[0]
        payload = Webhook(SECRET).verify(raw, headers)
        assert payload["type"] == "limit.threshold"
        assert payload["data"]["customer"] == "u_hook" and payload["data"]["threshold"] == 100
        assert Reference(SECRET).verify(raw.decode(), {k.lower(): v for k, v in headers.items()}) == payload
        with pytest.raises(WebhookVerificationError):
            Webhook(SECRET).verify(raw + b" ", headers)
    finally:
        if server is not None:
            server.stop()
        hook.shutdown()
