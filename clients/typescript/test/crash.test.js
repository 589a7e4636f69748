// The key property (issue 21, point 4): meterd is SIGKILLed twice, once while
// a batch is in flight and once right after it wrote a batch but before its
// answer reached the client, and restarted on the same port and data dir; the client
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
    let requests = 0;
    const kills = [];
    const restarting = [];
    const crash = (delay) =>
      restarting.push(
        (async () => {
          await sleep(delay);
          await server.kill();
          await sleep(1000);
          await server.restart();
        })(),
      );
    const killingFetch = async (url, init) => {
      if (!String(url).endsWith("/v1/events")) return fetch(url, init);
      requests++;
      if (requests === 8) {
        // The kill lands 0-4 ms after the request is sent: before or after
        // meterd wrote the batch, the answer is lost.
        kills.push(8);
        const p = fetch(url, init);
        crash(Math.floor(Math.random() * 5));
        return p;
      }
      if (requests === 25) {
        // meterd writes the batch and answers, and is killed before the answer
        // reaches the client: the retry must be answered as duplicates.
        kills.push(25);
        await (await fetch(url, init)).arrayBuffer();
        crash(0);
        throw new TypeError("fetch failed: the answer was lost");
      }
      return fetch(url, init);
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
    assert.deepEqual(kills, [8, 25], "meterd was killed twice");
    const stats = client.stats;
    assert.equal(stats.failed, 0);
    assert.equal(stats.dropped, 0);
    assert.ok(stats.retries >= 2, `retries: ${stats.retries}`);
    assert.ok(stats.duplicates >= 500, "the batch whose answer was lost was re-sent and deduplicated");
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
