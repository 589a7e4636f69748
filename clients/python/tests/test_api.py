"""Direct calls against a real meterd: check, consume, reserve/settle/release,
usage, balances, grants, entitlements, and the typed errors."""

from datetime import datetime, timedelta, timezone

import pytest

from meterd import Meterd, MeterdError, Retry, uuid7


def customer() -> str:
    return "c-" + uuid7()


def test_check_consume_and_the_limit(client):
    c = customer()
    first = client.check(c, "interviews")
    assert first["allowed"] is True and first["reason"] == "within_limit"
    assert first["limit"] == 3 and first["used"] == 0
    iv = "iv-" + uuid7()
    assert client.consume(c, "interviews", id=iv)["used"] == 1
    # The same id again: the same answer, nothing more recorded.
    assert client.consume(c, "interviews", id=iv)["used"] == 1
    client.consume(c, "interviews")
    client.consume(c, "interviews")
    denied = client.consume(c, "interviews")
    assert denied["allowed"] is False and denied["reason"] == "limit_exceeded" and denied["remaining"] == 0
    usage = client.customer_usage(c)
    assert usage["plan"] == "starter"
    assert next(m for m in usage["meters"] if m["meter"] == "interviews")["used"] == 3


def test_reserve_settle_release(client):
    c = customer()
    held = client.reserve(c, "interview_minutes", 60, expires_in="2h")
    assert held["allowed"] is True
    r = held["reservation"]
    assert r["status"] == "held" and r["quantity"] == 60 and r["expires_at"]
    during = client.check(c, "interview_minutes", 241)
    assert during["allowed"] is False, "the hold counts against the limit"
    assert during["held"] == 60

    settled = client.settle(r["id"], 42.5)
    assert settled["status"] == "settled" and settled["settled_quantity"] == 42.5
    # A second settle answers the first result and records nothing.
    assert client.settle(r["id"], 99)["settled_quantity"] == 42.5
    assert client.reservation(r["id"])["status"] == "settled"

    other = client.reserve(c, "interview_minutes", 100, id="r-" + uuid7())
    assert other["reservation"]["expires_at"] is None
    assert client.release(other["reservation"]["id"])["status"] == "released"

    after = client.check(c, "interview_minutes")
    assert after["used"] == 42.5 and after.get("held", 0) == 0
    now = datetime.now(timezone.utc)
    series = client.usage("interview_minutes", now - timedelta(days=1), now + timedelta(days=1), granularity="day", customer=c)
    assert sum(row["value"] for row in series["data"]) == 42.5

    big = client.reserve(c, "interview_minutes", 1000)
    assert big["allowed"] is False and big["reservation"]["status"] == "denied"


def test_grants_balances_entitlements(client):
    c = customer()
    gid = "g-" + uuid7()
    grant = client.create_grant(c, "ai_credits", 100, id=gid, reason="top-up")
    assert grant["amount"] == 100 and grant["status"] == "active"
    assert client.create_grant(c, "ai_credits", 100, id=gid, reason="top-up")["id"] == gid
    assert client.consume(c, "ai_credits", 30)["allowed"] is True
    row = next(b for b in client.balances(c)["balances"] if b["meter"] == "ai_credits")
    assert row["balance"] == 70 and row["granted"] == 100
    assert [(g["id"], g["remaining"]) for g in client.grants(c, meter="ai_credits")] == [(gid, 70)]
    assert client.void_grant(c, gid)["status"] == "voided"
    none = client.consume(c, "ai_credits", 1)
    assert none["allowed"] is False and none["reason"] == "insufficient_credits"

    e = client.set_entitlements(c, {"plan": "premium", "features": {"advanced_analytics": True}})
    assert e["plan"] == "premium"
    assert client.entitlements(c)["plan"] == "premium"
    assert client.check(c, "interviews")["reason"] == "unlimited"


def test_typed_errors(server, client):
    with pytest.raises(MeterdError) as e:
        client.request("POST", "/v1/check", {"customer": "x"})
    assert e.value.status == 400 and e.value.code == "invalid_request" and "meter" in e.value.message

    with pytest.raises(MeterdError) as e:
        client.ingest([{"customer": "x", "meter": "tokens"}, {"customer": "x", "meter": "no_such_meter"}])
    err = e.value
    assert err.status == 400 and err.code == "invalid_event" and not err.retryable
    assert err.details[0]["index"] == 1 and err.details[0]["field"] == "meter" and isinstance(err.details[0]["reason"], str)

    with pytest.raises(MeterdError) as e:
        client.reservation("no-such-reservation")
    assert (e.value.status, e.value.code) == (404, "not_found")

    with pytest.raises(MeterdError) as e:
        Meterd(server.url, "wrong").check("x", "tokens")
    assert (e.value.status, e.value.code) == (401, "unauthorized")

    nowhere = Meterd("http://127.0.0.1:1", retry=Retry(max_attempts=2, base_delay=0.01))
    with pytest.raises(MeterdError) as e:
        nowhere.check("x", "tokens")
    assert (e.value.status, e.value.code) == (0, "network_error")
    assert nowhere.stats["retries"] == 1

    with pytest.raises(MeterdError) as e:
        client.track({"customer": "", "meter": "tokens"})
    assert e.value.code == "invalid_event" and e.value.details[0]["field"] == "customer"
    with pytest.raises(MeterdError) as e:
        client.track({"customer": "x", "meter": "tokens", "quantity": -1})
    assert e.value.details[0]["field"] == "quantity"


def test_the_readme_interview_flow(client):
    meterd = client

    def start_interview(customer, interview_id):
        ok = meterd.check(customer, "interviews")
        if not ok["allowed"]:
            return {"started": False, "reason": ok["reason"]}
        hold = meterd.reserve(customer, "interview_minutes", 60, id=interview_id, expires_in="2h")
        if not hold["allowed"]:
            return {"started": False, "reason": hold["reason"]}
        counted = meterd.consume(customer, "interviews", id=f"start-{interview_id}")
        if not counted["allowed"]:
            meterd.release(interview_id)
            return {"started": False, "reason": counted["reason"]}
        return {"started": True}

    c = customer()
    ids = [f"iv-{i}-{uuid7()}" for i in range(4)]
    assert start_interview(c, ids[0]) == {"started": True}
    assert start_interview(c, ids[1]) == {"started": True}
    assert meterd.settle(ids[0], 45.5)["settled_quantity"] == 45.5
    assert meterd.settle(ids[1], 60)["settled_quantity"] == 60
    assert start_interview(c, ids[2]) == {"started": True}
    assert start_interview(c, ids[3]) == {"started": False, "reason": "limit_exceeded"}
    meterd.release(ids[2])
    used = {m["meter"]: m["used"] for m in meterd.customer_usage(c)["meters"]}
    assert used["interviews"] == 3 and used["interview_minutes"] == 105.5
