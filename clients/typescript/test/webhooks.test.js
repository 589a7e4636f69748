// The webhook verifier against the reference implementation (the npm
// `standardwebhooks` package) both ways, and against a real delivery from meterd.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { randomBytes } from "node:crypto";
import { execFileSync } from "node:child_process";
import { Webhook as Reference } from "standardwebhooks";
import { Meterd, Webhook, verifyWebhook, WebhookVerificationError } from "meterd";
import { MeterdProcess, sleep } from "./harness.js";

const secret = `whsec_${randomBytes(32).toString("base64")}`;
const body = JSON.stringify({ type: "limit.threshold", data: { customer: "u_42", used: 271.5, note: "ünïcode ✓" } });

test("the specification's example verifies", async () => {
  const wh = new Webhook("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
  const headers = {
    "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
    "webhook-timestamp": "1614265330",
    "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
  };
  const now = new Date(1614265330 * 1000);
  assert.deepEqual(await wh.verify('{"test": 2432232314}', headers, { now }), { test: 2432232314 });
  assert.equal(await wh.sign(headers["webhook-id"], 1614265330, '{"test": 2432232314}'), headers["webhook-signature"]);
});

test("signed by the reference, verified by ours", async () => {
  const ref = new Reference(secret);
  const id = "msg_" + randomBytes(8).toString("hex");
  const at = new Date();
  const signature = ref.sign(id, at, body);
  const headers = new Headers({ "webhook-id": id, "webhook-timestamp": String(Math.floor(at.getTime() / 1000)), "webhook-signature": signature });
  assert.deepEqual(await new Webhook(secret).verify(body, headers), JSON.parse(body));
  // Several signatures (a key rotation): any match verifies.
  headers.set("webhook-signature", `v1,${randomBytes(32).toString("base64")} ${signature}`);
  assert.deepEqual(await verifyWebhook(secret, new TextEncoder().encode(body), headers), JSON.parse(body));
  // A changed body, id or another secret: refused.
  await assert.rejects(new Webhook(secret).verify(body + " ", headers), WebhookVerificationError);
  headers.set("webhook-signature", signature);
  await assert.rejects(new Webhook(`whsec_${randomBytes(32).toString("base64")}`).verify(body, headers), WebhookVerificationError);
  headers.set("webhook-id", id + "x");
  await assert.rejects(new Webhook(secret).verify(body, headers), /no matching signature/);
});

test("signed by ours, verified by the reference", async () => {
  const id = "msg_" + randomBytes(8).toString("hex");
  const ts = Math.floor(Date.now() / 1000);
  const signature = await new Webhook(secret).sign(id, ts, body);
  const headers = { "webhook-id": id, "webhook-timestamp": String(ts), "webhook-signature": signature };
  assert.deepEqual(new Reference(secret).verify(body, headers), JSON.parse(body));
  assert.equal(signature, new Reference(secret).sign(id, new Date(ts * 1000), body));
});

test("the timestamp must be within 5 minutes", async () => {
  const wh = new Webhook(secret);
  const id = "msg_t";
  for (const [offset, ok] of [
    [-299, true],
    [299, true],
    [-301, false],
    [301, false],
  ]) {
    const ts = Math.floor(Date.now() / 1000) + offset;
    const headers = { "webhook-id": id, "webhook-timestamp": String(ts), "webhook-signature": await wh.sign(id, ts, body) };
    if (ok) assert.deepEqual(await wh.verify(body, headers), JSON.parse(body));
    else await assert.rejects(wh.verify(body, headers), /timestamp too (old|new)/);
    // The reference agrees.
    if (ok) new Reference(secret).verify(body, headers);
    else assert.throws(() => new Reference(secret).verify(body, headers));
  }
  await assert.rejects(wh.verify(body, { "webhook-id": id, "webhook-timestamp": "soon", "webhook-signature": "v1,x" }), WebhookVerificationError);
  await assert.rejects(wh.verify(body, {}), /missing/);
});

test("a real notification from meterd verifies", { timeout: 60_000 }, async () => {
  const received = [];
  const hook = createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      received.push({ headers: req.headers, body: Buffer.concat(chunks) });
      res.writeHead(200).end();
    });
  });
  await new Promise((r) => hook.listen(0, "127.0.0.1", r));
  let server;
  try {
    server = await MeterdProcess.start({
      extra: `\n[notifications]\nthresholds = [100]\n\n[[notifications.endpoints]]\nname = "app"\nurl = "http://127.0.0.1:${hook.address().port}/hook"\nsecret_env = "METERD_TS_WEBHOOK_SECRET"\n`,
      env: { METERD_TS_WEBHOOK_SECRET: secret },
    });
    const client = new Meterd({ baseUrl: server.url, apiKey: server.apiKey });
    for (let i = 0; i < 3; i++) await client.consume({ customer: "u_hook", meter: "interviews" });
    const deadline = Date.now() + 20_000;
    while (received.length === 0 && Date.now() < deadline) await sleep(50);
    assert.equal(received.length >= 1, true, "meterd delivered the 100% notification");
    const { headers, body: raw } = received[0];
    const payload = await new Webhook(secret).verify(raw, headers);
    assert.equal(payload.type, "limit.threshold");
    assert.equal(payload.data.customer, "u_hook");
    assert.equal(payload.data.threshold, 100);
    assert.deepEqual(new Reference(secret).verify(raw.toString("utf8"), headers), payload);
    await assert.rejects(new Webhook(secret).verify(Buffer.concat([raw, Buffer.from(" ")]), headers), WebhookVerificationError);
  } finally {
    await server?.stop();
    hook.close();
  }
});

test("without globalThis.crypto (Node 18), node:crypto's webcrypto is used", () => {
  const code = `
    Object.defineProperty(globalThis, "crypto", { value: undefined, configurable: true });
    const m = await import("meterd");
    const sig = await new m.Webhook("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, '{"test": 2432232314}');
    console.log(JSON.stringify({ crypto: typeof globalThis.crypto, sig, id: m.uuidv7() }));`;
  const out = JSON.parse(execFileSync(process.execPath, ["--input-type=module", "-e", code], { cwd: new URL("..", import.meta.url) }).toString());
  assert.equal(out.crypto, "undefined");
  assert.equal(out.sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
  assert.match(out.id, /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
});
