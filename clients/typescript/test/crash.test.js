// The key property (issue 21, point 4): meterd is SIGKILLed while a batch is
// in flight, twice, and restarted on the same port and data dir; the client
// keeps tracking, retries with the same ids, and after close() meterd's total
// is exactly the number of events tracked: every event counted once, never
// more, whatever answer was lost.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Meterd } from "meterd";
import { MeterdProcess, sleep } from "./harness.js";

test("SIGKILL mid-batch and restart: the total is exactly what was tracked", { timeout: 120_000 }, async () => {
  const server = await MeterdProcess.start();
  try {
    const N = 30_000;
    const killAt = new Set([8, 25]); // the 8th and 25th events request
    let requests = 0;
    const kills = [];
    const restarting = [];
    // A fetch that SIGKILLs meterd while chosen requests are on the wire: the
    // request is sent, then the kill lands 0-4 ms later, before or after
    // meterd has written the batch, so the answer is lost either way.
    const killingFetch = (url, init) => {
      const p = fetch(url, init);
      if (String(url).endsWith("/v1/events") && killAt.has(++requests)) {
        killAt.delete(requests);
        kills.push(requests);
        restarting.push(
          (async () => {
            await sleep(Math.floor(Math.random() * 5));
            await server.kill();
            await sleep(1000);
            await server.restart();
          })(),
        );
      }
      return p;
    };
    const client = new Meterd({
      baseUrl: server.url,
      apiKey: server.apiKey,
      fetch: killingFetch,
      batchSize: 500,
      flushIntervalMs: 50,
      maxBufferSize: N, // nothing dropped while meterd is down
      batchRetry: { maxAttempts: 30, baseDelayMs: 50, maxDelayMs: 500 },
    });
    for (let i = 0; i < N; i++) {
      client.track({ customer: `c${i % 13}`, meter: "tokens" });
      if (i % 250 === 249) await sleep(2); // a producer that takes its time
    }
    await client.close();
    await Promise.all(restarting);
    assert.deepEqual(kills, [8, 25], "meterd was killed twice mid-batch");
    const stats = client.stats;
    console.log("crash test stats", JSON.stringify(stats));
    assert.equal(stats.failed, 0);
    assert.equal(stats.dropped, 0);
    assert.ok(stats.retries >= 2, `retries: ${stats.retries}`);
    // Each event got exactly one answer: accepted, or (its first answer lost
    // with the kill) a duplicate of what meterd had already written.
    assert.equal(stats.accepted + stats.duplicates, N);
    assert.equal(await server.total("tokens"), N);
    // And after another restart (the WAL replayed, nothing doubled).
    await server.kill();
    await server.restart();
    assert.equal(await server.total("tokens"), N);
  } finally {
    await server.stop();
  }
});
