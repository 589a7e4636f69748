// Direct calls against a real meterd: check, consume, reserve/settle/release,
// usage, balances, grants, entitlements, and the typed errors.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Meterd, MeterdError, uuidv7 } from "meterd";
import { MeterdProcess } from "./harness.js";

let server;
let client;
before(async () => {
  server = await MeterdProcess.start();
  client = new Meterd({ baseUrl: server.url, apiKey: server.apiKey });
});
after(async () => {
  await client?.close();
  await server?.stop();
});

const customer = () => `c-${uuidv7()}`;

test("check, consume and the limit", async () => {
  const c = customer();
  const first = await client.check({ customer: c, meter: "interviews" });
  assert.equal(first.allowed, true);
  assert.equal(first.reason, "within_limit");
  assert.equal(first.limit, 3);
  assert.equal(first.used, 0);
  const id = `iv-${uuidv7()}`;
  const a = await client.consume({ customer: c, meter: "interviews", id });
  assert.equal(a.allowed, true);
  assert.equal(a.used, 1);
  // The same id again: the same answer, nothing more recorded.
  const again = await client.consume({ customer: c, meter: "interviews", id });
  assert.equal(again.used, 1);
  await client.consume({ customer: c, meter: "interviews" });
  await client.consume({ customer: c, meter: "interviews" });
  const denied = await client.consume({ customer: c, meter: "interviews" });
  assert.equal(denied.allowed, false);
  assert.equal(denied.reason, "limit_exceeded");
  assert.equal(denied.remaining, 0);
  const usage = await client.customerUsage(c);
  assert.equal(usage.plan, "starter");
  const row = usage.meters.find((m) => m.meter === "interviews");
  assert.equal(row.used, 3);
});

test("reserve, settle and release", async () => {
  const c = customer();
  const held = await client.reserve({ customer: c, meter: "interview_minutes", quantity: 60, expiresIn: "2h" });
  assert.equal(held.allowed, true);
  assert.equal(held.reservation.status, "held");
  assert.equal(held.reservation.quantity, 60);
  assert.ok(held.reservation.expires_at);
  const during = await client.check({ customer: c, meter: "interview_minutes", quantity: 241 });
  assert.equal(during.allowed, false, "the hold counts against the limit");
  assert.equal(during.held, 60);

  const settled = await client.settle(held.reservation.id, { quantity: 42.5 });
  assert.equal(settled.status, "settled");
  assert.equal(settled.settled_quantity, 42.5);
  // A second settle answers the first result and records nothing.
  const again = await client.settle(held.reservation.id, { quantity: 99 });
  assert.equal(again.settled_quantity, 42.5);
  assert.equal((await client.reservation(held.reservation.id)).status, "settled");

  const other = await client.reserve({ id: `r-${uuidv7()}`, customer: c, meter: "interview_minutes", quantity: 100 });
  assert.equal(other.reservation.status, "held");
  assert.equal(other.reservation.expires_at, null);
  const released = await client.release(other.reservation.id);
  assert.equal(released.status, "released");

  const after = await client.check({ customer: c, meter: "interview_minutes" });
  assert.equal(after.used, 42.5);
  assert.equal(after.held ?? 0, 0);
  const series = await client.usage({
    meter: "interview_minutes",
    customer: c,
    from: new Date(Date.now() - 86_400_000),
    to: new Date(Date.now() + 86_400_000),
    granularity: "day",
  });
  assert.equal(
    series.data.reduce((s, r) => s + r.value, 0),
    42.5,
  );

  // Too much: denied, holds nothing.
  const big = await client.reserve({ customer: c, meter: "interview_minutes", quantity: 1000 });
  assert.equal(big.allowed, false);
  assert.equal(big.reservation.status, "denied");
});

test("grants, balances and entitlements", async () => {
  const c = customer();
  const grant = await client.createGrant(c, { id: `g-${uuidv7()}`, meter: "ai_credits", amount: 100, reason: "top-up" });
  assert.equal(grant.amount, 100);
  assert.equal(grant.status, "active");
  // The same id and body again: the stored grant, nothing more.
  const again = await client.createGrant(c, { id: grant.id, meter: "ai_credits", amount: 100, reason: "top-up" });
  assert.equal(again.id, grant.id);
  const spent = await client.consume({ customer: c, meter: "ai_credits", quantity: 30 });
  assert.equal(spent.allowed, true);
  const b = await client.balances(c);
  const row = b.balances.find((x) => x.meter === "ai_credits");
  assert.equal(row.balance, 70);
  assert.equal(row.granted, 100);
  const list = await client.grants(c, { meter: "ai_credits" });
  assert.deepEqual(
    list.map((g) => [g.id, g.remaining]),
    [[grant.id, 70]],
  );
  const voided = await client.voidGrant(c, grant.id);
  assert.equal(voided.status, "voided");
  const none = await client.consume({ customer: c, meter: "ai_credits", quantity: 1 });
  assert.equal(none.allowed, false);
  assert.equal(none.reason, "insufficient_credits");

  const e = await client.setEntitlements(c, { plan: "premium", features: { advanced_analytics: true } });
  assert.equal(e.plan, "premium");
  assert.equal((await client.entitlements(c)).plan, "premium");
  assert.equal((await client.check({ customer: c, meter: "interviews" })).reason, "unlimited");
});

test("typed errors carry status, code and details", async () => {
  // A check without a meter: invalid_request naming the field.
  await assert.rejects(client.check({ customer: "x" }), (e) => {
    assert.ok(e instanceof MeterdError);
    assert.equal(e.status, 400);
    assert.equal(e.code, "invalid_request");
    assert.match(e.message, /meter/);
    return true;
  });
  // A batch with a bad event: invalid_event with {index, field, reason} details.
  await assert.rejects(
    client.ingest([
      { customer: "x", meter: "tokens" },
      { customer: "x", meter: "no_such_meter" },
    ]),
    (e) => {
      assert.ok(e instanceof MeterdError);
      assert.equal(e.status, 400);
      assert.equal(e.code, "invalid_event");
      assert.ok(Array.isArray(e.details));
      assert.equal(e.details[0].index, 1);
      assert.equal(e.details[0].field, "meter");
      assert.equal(typeof e.details[0].reason, "string");
      assert.equal(e.retryable, false);
      return true;
    },
  );
  // Unknown reservation: not_found. Wrong key: unauthorized.
  await assert.rejects(client.reservation("no-such-reservation"), (e) => e.status === 404 && e.code === "not_found");
  const stranger = new Meterd({ baseUrl: server.url, apiKey: "wrong" });
  await assert.rejects(stranger.check({ customer: "x", meter: "tokens" }), (e) => e.status === 401 && e.code === "unauthorized");
  // Nothing listening: a network error, retried, then thrown.
  const nowhere = new Meterd({ baseUrl: "http://127.0.0.1:1", retry: { maxAttempts: 2, baseDelayMs: 10 } });
  await assert.rejects(nowhere.check({ customer: "x", meter: "tokens" }), (e) => e.status === 0 && e.code === "network_error");
  assert.equal(nowhere.stats.retries, 1);
  // Bad events are refused by track() itself, before buffering.
  assert.throws(() => client.track({ customer: "", meter: "tokens" }), (e) => e.code === "invalid_event" && e.details[0].field === "customer");
  assert.throws(() => client.track({ customer: "x", meter: "tokens", quantity: -1 }), (e) => e.details[0].field === "quantity");
});

test("the README's interview flow: check, reserve, consume, settle", async () => {
  const meterd = client;
  async function startInterview(customer, interviewId) {
    const ok = await meterd.check({ customer, meter: "interviews" });
    if (!ok.allowed) return { started: false, reason: ok.reason };
    const hold = await meterd.reserve({ id: interviewId, customer, meter: "interview_minutes", quantity: 60, expiresIn: "2h" });
    if (!hold.allowed) return { started: false, reason: hold.reason };
    const counted = await meterd.consume({ customer, meter: "interviews", id: `start-${interviewId}` });
    if (!counted.allowed) {
      await meterd.release(interviewId);
      return { started: false, reason: counted.reason };
    }
    return { started: true };
  }
  const c = customer();
  const ids = [1, 2, 3, 4].map((i) => `iv-${i}-${uuidv7()}`);
  assert.deepEqual(await startInterview(c, ids[0]), { started: true });
  assert.deepEqual(await startInterview(c, ids[1]), { started: true });
  assert.equal((await client.settle(ids[0], { quantity: 45.5 })).settled_quantity, 45.5);
  assert.equal((await client.settle(ids[1], { quantity: 60 })).settled_quantity, 60);
  assert.deepEqual(await startInterview(c, ids[2]), { started: true });
  assert.deepEqual(await startInterview(c, ids[3]), { started: false, reason: "limit_exceeded" });
  await client.release(ids[2]);
  const usage = await client.customerUsage(c);
  const used = Object.fromEntries(usage.meters.map((m) => [m.meter, m.used]));
  assert.equal(used.interviews, 3);
  assert.equal(used.interview_minutes, 105.5);
});
