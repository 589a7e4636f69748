// track(): batching by size and time, flush on close, the buffer-full
// policies, invalid events in a batch, Retry-After, against a real meterd.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Meterd, BufferFullError, MeterdError, uuidv7 } from "meterd";
import { MeterdProcess, sleep } from "./harness.js";

let server;
before(async () => {
  server = await MeterdProcess.start();
});
after(async () => {
  await server?.stop();
});

/** A fetch that records each events batch size and can be held shut. */
function gatedFetch() {
  const g = { sizes: [], times: [], open: true, waiters: [] };
  g.fetch = async (url, init) => {
    if (String(url).endsWith("/v1/events")) {
      g.sizes.push(JSON.parse(init.body).length);
      g.times.push(Date.now());
      while (!g.open) await new Promise((r) => g.waiters.push(r));
    }
    return fetch(url, init);
  };
  g.hold = () => {
    g.open = false;
  };
  g.release = () => {
    g.open = true;
    for (const w of g.waiters.splice(0)) w();
  };
  return g;
}

async function customerTotal(c) {
  const body = await server.get(
    `/v1/usage?meter=tokens&customer=${c}&from=${new Date(Date.now() - 86_400_000).toISOString()}&to=${new Date(Date.now() + 86_400_000).toISOString()}&granularity=day`,
  );
  return body.data.reduce((s, r) => s + r.value, 0);
}

test("sends by size, then by time, and fills ids and timestamps", async () => {
  const g = gatedFetch();
  const client = new Meterd({ baseUrl: server.url, apiKey: server.apiKey, fetch: g.fetch, batchSize: 100, flushIntervalMs: 300 });
  const c = `c-${uuidv7()}`;
  const start = Date.now();
  for (let i = 0; i < 250; i++) client.track({ customer: c, meter: "tokens", quantity: 2 });
  // The 100th event sent the first batch at once (one batch in flight at a time).
  assert.deepEqual(g.sizes, [100]);
  const deadline = Date.now() + 10_000;
  while (g.sizes.length < 3 && Date.now() < deadline) await sleep(10);
  // The second full batch followed; the 50 left waited for the interval.
  assert.deepEqual(g.sizes, [100, 100, 50]);
  assert.ok(g.times[2] - start >= 290, `the partial batch went after ${g.times[2] - start} ms`);
  await client.flush();
  assert.equal(await customerTotal(c), 500);
  assert.equal(client.stats.accepted, 250);
  await client.close();
});

test("close() flushes what is buffered; track() after close throws", async () => {
  const client = new Meterd({ baseUrl: server.url, apiKey: server.apiKey, flushIntervalMs: 60_000 });
  const c = `c-${uuidv7()}`;
  for (let i = 0; i < 10; i++) client.track({ customer: c, meter: "tokens" });
  assert.equal(client.stats.buffered, 10);
  await client.close();
  assert.equal(client.stats.buffered, 0);
  assert.equal(await customerTotal(c), 10);
  assert.throws(() => client.track({ customer: c, meter: "tokens" }), (e) => e instanceof MeterdError && e.code === "closed");
});

test("a given id is kept: the same event tracked twice counts once", async () => {
  const client = new Meterd({ baseUrl: server.url, apiKey: server.apiKey });
  const c = `c-${uuidv7()}`;
  const id = `e-${uuidv7()}`;
  client.track({ id, customer: c, meter: "tokens", quantity: 5 });
  await client.flush();
  client.track({ id, customer: c, meter: "tokens", quantity: 5 });
  await client.close();
  assert.equal(client.stats.accepted, 1);
  assert.equal(client.stats.duplicates, 1);
  assert.equal(await customerTotal(c), 5);
});

test("an invalid event is reported and the rest of its batch is still counted", async () => {
  const errors = [];
  const client = new Meterd({ baseUrl: server.url, apiKey: server.apiKey, onError: (e, evs) => errors.push([e, evs]) });
  const c = `c-${uuidv7()}`;
  client.track({ customer: c, meter: "tokens" });
  client.track({ customer: c, meter: "no_such_meter" });
  client.track({ customer: c, meter: "tokens" });
  await assert.rejects(client.flush(), (e) => e.code === "invalid_event");
  assert.equal(errors.length, 1);
  assert.equal(errors[0][1].length, 1);
  assert.equal(errors[0][1][0].meter, "no_such_meter");
  assert.equal(client.stats.failed, 1);
  assert.equal(await customerTotal(c), 2);
  await client.close(); // nothing left to report
});

test('onFull "drop-oldest" drops the oldest waiting events', async () => {
  const g = gatedFetch();
  const dropped = [];
  const client = new Meterd({
    baseUrl: server.url,
    apiKey: server.apiKey,
    fetch: g.fetch,
    batchSize: 5,
    maxBufferSize: 10,
    onDrop: (evs) => dropped.push(...evs),
  });
  const c = `c-${uuidv7()}`;
  g.hold();
  for (let i = 1; i <= 5; i++) client.track({ customer: c, meter: "tokens", quantity: i, id: `${c}-${i}` });
  await sleep(20); // the first batch (1..5) is in flight, held
  for (let i = 6; i <= 18; i++) client.track({ customer: c, meter: "tokens", quantity: 1, id: `${c}-${i}` });
  assert.deepEqual(
    dropped.map((e) => e.id),
    [6, 7, 8].map((i) => `${c}-${i}`),
  );
  assert.equal(client.stats.dropped, 3);
  g.release();
  await client.close();
  assert.equal(await customerTotal(c), 15 + 10);
});

test('onFull "throw" throws BufferFullError and keeps what it has', async () => {
  const g = gatedFetch();
  const client = new Meterd({ baseUrl: server.url, apiKey: server.apiKey, fetch: g.fetch, batchSize: 5, maxBufferSize: 10, onFull: "throw" });
  const c = `c-${uuidv7()}`;
  g.hold();
  for (let i = 0; i < 5; i++) client.track({ customer: c, meter: "tokens" });
  await sleep(20);
  for (let i = 0; i < 10; i++) client.track({ customer: c, meter: "tokens" });
  assert.throws(() => client.track({ customer: c, meter: "tokens" }), (e) => e instanceof BufferFullError && e.code === "buffer_full");
  assert.equal(client.stats.tracked, 15);
  g.release();
  await client.close();
  assert.equal(await customerTotal(c), 15);
});

test('onFull "block" waits for room and loses nothing', async () => {
  const g = gatedFetch();
  const client = new Meterd({ baseUrl: server.url, apiKey: server.apiKey, fetch: g.fetch, batchSize: 5, maxBufferSize: 10, onFull: "block" });
  const c = `c-${uuidv7()}`;
  g.hold();
  for (let i = 0; i < 5; i++) await client.track({ customer: c, meter: "tokens" });
  await sleep(20);
  for (let i = 0; i < 10; i++) await client.track({ customer: c, meter: "tokens" });
  let done = false;
  const blocked = client.track({ customer: c, meter: "tokens" }).then(() => {
    done = true;
  });
  await sleep(50);
  assert.equal(done, false, "track() waits while the buffer is full");
  g.release();
  await blocked;
  assert.equal(done, true);
  await client.close();
  assert.equal(await customerTotal(c), 16);
  assert.equal(client.stats.dropped, 0);
});

test("a real 429 with Retry-After is honoured and the batch is retried byte for byte", async () => {
  // The "limited" key allows one request a second: the second is a 429 with Retry-After.
  const bodies = [];
  const times = [];
  const statuses = [];
  const recording = async (url, init) => {
    const res = await fetch(url, init);
    if (String(url).endsWith("/v1/events")) {
      bodies.push(init.body);
      times.push(Date.now());
      statuses.push(res.status);
    }
    return res;
  };
  const client = new Meterd({ baseUrl: server.url, apiKey: server.limitedKey, fetch: recording, flushIntervalMs: 10 });
  const c = `c-${uuidv7()}`;
  await client.ingest([{ customer: c, meter: "tokens", quantity: 1 }]);
  client.track({ customer: c, meter: "tokens", quantity: 3 });
  await client.close();
  assert.deepEqual(statuses, [202, 429, 202]);
  assert.equal(bodies[1], bodies[2], "the retry is byte for byte the same batch");
  assert.ok(times[2] - times[1] >= 900, `waited ${times[2] - times[1]} ms for Retry-After`);
  assert.equal(client.stats.retries, 1);
  assert.equal(await customerTotal(c), 4);
});

test("normalize: a UUIDv7 id and a timestamp when absent; given ones kept", async () => {
  const { normalize } = await import("meterd");
  const before = Date.now();
  const a = normalize({ customer: "c", meter: "tokens" });
  const b = normalize({ customer: "c", meter: "tokens" });
  assert.match(a.id, /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  assert.notEqual(a.id, b.id);
  assert.ok(a.timestamp >= before && a.timestamp <= Date.now());
  const at = new Date("2026-11-20T10:00:00Z");
  assert.deepEqual(normalize({ id: "x", customer: "c", meter: "m", quantity: 2, timestamp: at, properties: { k: "v" } }), {
    id: "x",
    customer: "c",
    meter: "m",
    quantity: 2,
    timestamp: "2026-11-20T10:00:00.000Z",
    properties: { k: "v" },
  });
});

test("flush({timeoutMs}) gives up waiting, not on the events", async () => {
  const client = new Meterd({ baseUrl: "http://127.0.0.1:1", batchRetry: { maxAttempts: 4, baseDelayMs: 100, maxDelayMs: 100 } });
  client.track({ customer: "c", meter: "tokens" });
  const started = Date.now();
  await assert.rejects(client.flush({ timeoutMs: 150 }), (e) => e instanceof MeterdError && e.code === "timeout");
  assert.ok(Date.now() - started < 1000);
  assert.equal(client.stats.inFlight, 1, "still being retried");
  // Retries exhausted: the events are reported, and the next flush says so.
  await assert.rejects(client.close(), (e) => e.code === "network_error");
  assert.equal(client.stats.failed, 1);
});
