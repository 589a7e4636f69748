// The console and the widget in real Chromium (issue 22), run by
// scripts/test.d/40-browser: starts target/debug/meterd with an admin key,
// seeds customers through the API, drives Debian's Chromium with
// playwright-core, and saves screenshots in WORK (in docs/img/ when
// METERD_UPDATE_SCREENSHOTS=1, to refresh the ones the docs show).
//
// Environment: METERD_BIN (the binary), METERD_ROOT (the repository),
// CHROMIUM (the browser), WORK (a fresh scratch directory).

import { chromium } from "playwright-core";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createServer } from "node:http";
import { mkdirSync, writeFileSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { randomBytes } from "node:crypto";

const { METERD_BIN, METERD_ROOT, CHROMIUM, WORK } = process.env;
for (const [k, v] of Object.entries({ METERD_BIN, METERD_ROOT, CHROMIUM, WORK })) assert.ok(v, `${k} must be set`);

const ADMIN_KEY = randomBytes(24).toString("hex");
const SHOTS = process.env.METERD_UPDATE_SCREENSHOTS === "1" ? join(METERD_ROOT, "docs/img") : WORK;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let step = "setup";
const log = (m) => console.log(`[browser] ${m}`);

/** Listens on a free loopback port; resolves to the port. */
const listen = (server) => new Promise((res) => server.listen(0, "127.0.0.1", () => res(server.address().port)));

// A webhook receiver for the notifications (so the customer page lists some).
const hooks = [];
const hookServer = createServer((req, res) => {
  let body = "";
  req.on("data", (d) => (body += d));
  req.on("end", () => {
    hooks.push(body);
    res.writeHead(204).end();
  });
});
const hookPort = await listen(hookServer);

// The product's own page, on another origin, embedding the widget.
let embedHtml = "";
const embedServer = createServer((req, res) => {
  if (req.url === "/") res.writeHead(200, { "content-type": "text/html; charset=utf-8" }).end(embedHtml);
  else res.writeHead(204).end(); // favicon.ico
});
const embedPort = await listen(embedServer);

// meterd with an admin key, notifications and two plans.
const probe = createServer();
const port = await listen(probe);
await new Promise((r) => probe.close(r));
const base = `http://127.0.0.1:${port}`;
const dataDir = join(WORK, "data");
mkdirSync(dataDir, { recursive: true });
const config = join(WORK, "meterd.toml");
writeFileSync(
  config,
  `[server]
listen = "127.0.0.1:${port}"
[storage]
data_dir = "${dataDir}"
durability = "buffered"
flush_interval = "1s"

[[meters]]
name = "interview_minutes"
aggregation = "sum"
[[meters]]
name = "api_calls"
aggregation = "count"
[[meters]]
name = "ai_tokens"
aggregation = "sum"

[[plans]]
name = "starter"
default = true
features = { recordings = false }
[plans.limits]
interview_minutes = { limit = 100, window = "month" }
api_calls = [ { limit = 5000, window = "day" }, { limit = 1000, window = "minute" } ]
ai_tokens = { limit = "credits", low_balance = 1000 }

[[plans]]
name = "pro"
features = { recordings = true }
[plans.limits]
interview_minutes = { limit = 1000, window = "month" }
api_calls = { limit = "unlimited" }
ai_tokens = { limit = "credits", low_balance = 1000 }

[notifications]
thresholds = [75, 90, 100]
[[notifications.endpoints]]
name = "app"
url = "http://127.0.0.1:${hookPort}/hook"
secret_env = "METERD_UI_WEBHOOK_SECRET"

[[auth.keys]]
name = "console-admin"
key_env = "METERD_UI_ADMIN_KEY"
scopes = ["ingest", "check", "read", "admin"]
`,
);
const meterdLog = join(WORK, "meterd.log");
const meterd = spawn(METERD_BIN, ["--config", config], {
  env: { ...process.env, METERD_UI_ADMIN_KEY: ADMIN_KEY, METERD_UI_WEBHOOK_SECRET: `whsec_${randomBytes(32).toString("base64")}`, RUST_LOG: "warn" },
  stdio: ["ignore", "pipe", "pipe"],
});
let meterdOut = "";
meterd.stdout.on("data", (d) => (meterdOut += d));
meterd.stderr.on("data", (d) => (meterdOut += d));
const meterdExit = new Promise((r) => meterd.on("exit", r));

let browser = null;
let openMeterd = null; // the second instance, without keys
async function shutdown() {
  if (browser) await browser.close().catch(() => {});
  if (openMeterd) openMeterd.kill("SIGKILL");
  meterd.kill("SIGTERM");
  await Promise.race([meterdExit, sleep(10000)]);
  hookServer.close();
  embedServer.close();
  writeFileSync(meterdLog, meterdOut);
}

/** Calls meterd with the admin key (or `token`). */
async function call(method, path, body, token = ADMIN_KEY) {
  const res = await fetch(base + path, {
    method,
    headers: { authorization: `Bearer ${token}`, ...(body ? { "content-type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : null };
}
const ok = async (method, path, body) => {
  const r = await call(method, path, body);
  assert.ok(r.status < 300, `${method} ${path}: ${r.status} ${JSON.stringify(r.body)}`);
  return r.body;
};

try {
  step = "meterd start";
  for (let i = 0; ; i++) {
    const up = await fetch(`${base}/healthz`).then((r) => r.ok).catch(() => false);
    if (up) break;
    assert.ok(i < 200 && meterd.exitCode === null, `meterd did not start:\n${meterdOut}`);
    await sleep(50);
  }

  step = "seed";
  const ent = (plan, extra = {}) => ({ plan, ...extra });
  await ok("PUT", "/v1/customers/acme/entitlements", ent("starter", { stripe_customer_id: "cus_ACME" }));
  await ok("PUT", "/v1/customers/globex/entitlements", ent("starter"));
  await ok("PUT", "/v1/customers/hooli/entitlements", ent("starter", { stripe_customer_id: "cus_HOOLI" }));
  await ok("PUT", "/v1/customers/initech/entitlements", ent("pro", { stripe_customer_id: "cus_INI" }));
  const ev = (id, customer, meter, quantity, timestamp) => ({ id, customer, meter, quantity, ...(timestamp ? { timestamp } : {}) });
  await ok("POST", "/v1/events", [
    ev("a1", "acme", "interview_minutes", 60),
    ev("a2", "acme", "interview_minutes", 40),
    ev("g1", "globex", "interview_minutes", 80),
    ev("h1", "hooli", "interview_minutes", 93.0),
    ev("i1", "initech", "interview_minutes", 120),
  ]);
  // History: api calls over the last 48 hours (older days count in no current limit but the day's).
  const now = Date.now();
  const calls = [];
  for (let k = 0; k < 240; k++) {
    const who = k % 3 === 0 ? "initech" : k % 3 === 1 ? "acme" : "globex";
    calls.push(ev(`c${k}`, who, "api_calls", 1, now - Math.floor((k / 240) * 47 * 3600e3) - 60e3));
  }
  await ok("POST", "/v1/events", calls);
  await ok("POST", "/v1/customers/acme/grants", { id: "topup-1", meter: "ai_tokens", amount: 5000, reason: "pack" });
  await ok("POST", "/v1/events", [ev("t1", "acme", "ai_tokens", 1200)]);
  // A reservation holds 200 api calls of acme's day.
  const held = await ok("POST", "/v1/reservations", { id: "res-1", customer: "acme", meter: "api_calls", quantity: 200, expires_in: "2h" });
  assert.equal(held.reservation.status, "held");
  // acme is at its limit: a check is denied.
  const denied = await ok("POST", "/v1/check", { customer: "acme", meter: "interview_minutes", quantity: 1 });
  assert.equal(denied.allowed, false, "acme at 100/100 is denied");
  assert.equal(denied.reason, "limit_exceeded");
  // Portal tokens for the widget.
  const acmeToken = (await ok("POST", "/v1/customers/acme/portal-tokens", { expires_in: "1h" })).token;
  const globexToken = (await ok("POST", "/v1/customers/globex/portal-tokens", { expires_in: "1h" })).token;
  // The threshold notifications reached the hook.
  for (let i = 0; hooks.length < 3 && i < 100; i++) await sleep(100);
  assert.ok(hooks.length >= 3, `notifications delivered: ${hooks.length}`);

  step = "browser";
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--disable-dev-shm-usage",
    ],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, colorScheme: "light" });
  const page = await context.newPage();
  const errors = [];
  page.on("console", (m) => {
    if (m.type() === "error") errors.push(m.text());
  });
  page.on("pageerror", (e) => errors.push(`page error: ${e.message}`));
  const noErrors = (where) => {
    assert.deepEqual(errors, [], `console errors on ${where}`);
  };

  // --- the console needs the key -------------------------------------------
  step = "key prompt";
  await page.goto(`${base}/ui/`);
  await page.getByRole("alert").filter({ hasText: "needs an API key" }).waitFor();
  noErrors("the key prompt");
  await page.getByLabel("API key").fill(ADMIN_KEY);
  await page.getByRole("button", { name: "Use" }).click();

  // --- customers ----------------------------------------------------------
  step = "customers page";
  const customerLinks = page.locator("#customers tbody a");
  await page.waitForFunction(() => document.querySelectorAll("#customers tbody a").length >= 4);
  assert.deepEqual(await customerLinks.allTextContents(), ["acme", "globex", "hooli", "initech"]);
  await page.getByLabel("Customer prefix").fill("gl");
  await page.waitForFunction(() => [...document.querySelectorAll("#customers tbody a")].map((a) => a.textContent).join() === "globex");
  await page.getByLabel("Customer prefix").fill("");
  await page.waitForFunction(() => document.querySelectorAll("#customers tbody a").length === 4);
  await page.getByLabel("Plan").selectOption("pro");
  assert.deepEqual(await customerLinks.allTextContents(), ["initech"]);
  await page.getByLabel("Plan").selectOption("");
  await page.getByLabel("Stripe customer id").fill("cus_HOO");
  assert.deepEqual(await customerLinks.allTextContents(), ["hooli"]);
  noErrors("the customers page");

  // --- one customer: the denied one shows a red bar with its numbers ----------
  step = "customer page";
  await page.getByRole("link", { name: "hooli" }).click();
  await page.getByRole("progressbar", { name: "interview_minutes (month)" }).waitFor();
  assert.equal(await page.getByRole("progressbar", { name: "interview_minutes (month)" }).getAttribute("data-level"), "high", "93 % is orange");
  await page.goto(`${base}/ui/#/customer/acme`);
  const minutes = page.getByRole("progressbar", { name: "interview_minutes (month)" });
  await minutes.waitFor();
  const row = page.locator('.limit[data-meter="interview_minutes"]');
  assert.equal(await minutes.getAttribute("data-level"), "over");
  assert.equal(await minutes.getAttribute("aria-valuenow"), "100");
  assert.equal(await minutes.getAttribute("aria-valuemax"), "100");
  const red = await minutes.locator(".used").evaluate((el) => [getComputedStyle(el).backgroundColor, el.getBoundingClientRect().width / el.parentElement.getBoundingClientRect().width]);
  assert.equal(red[0], "rgb(198, 40, 40)", "the bar is red");
  assert.ok(red[1] > 0.99, `the bar is full: ${red[1]}`);
  assert.equal(await row.locator('[data-f="used"]').textContent(), "100");
  assert.equal(await row.locator('[data-f="limit"]').textContent(), "100");
  assert.equal(await row.locator('[data-f="remaining"]').textContent(), "0");
  assert.match(await row.locator('[data-f="resets_at"]').textContent(), /^\d{4}-\d\d-01 00:00 UTC$/);
  assert.match(await row.textContent(), /at limit: denied/);
  // Held quantity, and the reservation looked up by id.
  const day = page.locator('.limit[data-meter="api_calls"][data-window="day"]');
  assert.equal(await day.locator('[data-f="held"]').textContent(), "200");
  const heldWidth = await day.locator(".held").evaluate((el) => el.getBoundingClientRect().width);
  assert.ok(heldWidth > 10, `the held part is drawn: ${heldWidth}px`);
  // The open reservation is listed with its meter, quantity and expiry.
  const open = page.locator("#reservations tbody tr", { hasText: "res-1" });
  await open.waitFor();
  assert.deepEqual(
    (await open.locator("td").allTextContents()).slice(0, 3),
    ["res-1", "api_calls", "200"],
    "the held reservation's id, meter and quantity",
  );
  assert.match(await open.locator("td").nth(3).textContent(), /^\d{4}-\d\d-\d\d \d\d:\d\d UTC$/, "its expiry");
  await page.getByLabel("Reservation id").fill("res-1");
  await page.getByRole("button", { name: "Look up" }).click();
  await page.locator("section td", { hasText: "held" }).first().waitFor();
  // Credits, grants and notifications.
  await page.locator("#balances td", { hasText: "3,800" }).waitFor();
  await page.locator("#grants td", { hasText: "topup-1" }).waitFor();
  await page.locator("#notifications td", { hasText: "100% of 100 (month)" }).waitFor();
  await page.locator("#entitlements select").waitFor();
  await page.waitForFunction(() => document.querySelector("#ent-plan").value === "starter");
  assert.equal(await page.locator("#ent-stripe_customer_id").inputValue(), "cus_ACME");
  noErrors("the customer page");
  // Keyboard: the bars take focus.
  await minutes.focus();
  assert.equal(await page.evaluate(() => document.activeElement.getAttribute("aria-label")), "interview_minutes (month)");
  mkdirSync(SHOTS, { recursive: true });
  await page.mouse.move(0, 0);
  await page.evaluate(() => document.activeElement.blur());
  await page.screenshot({ path: join(SHOTS, "console-customer.png"), fullPage: true });

  // --- live: new usage shows without a reload -----------------------------------
  step = "live refresh";
  await page.evaluate(() => (window.__noReload = true));
  await page.goto(`${base}/ui/#/customer/globex`);
  const gm = page.getByRole("progressbar", { name: "interview_minutes (month)" });
  await gm.waitFor();
  assert.equal(await gm.getAttribute("data-level"), "warn", "80 % is yellow");
  await ok("POST", "/v1/events", [ev("g2", "globex", "interview_minutes", 15)]);
  await page.waitForFunction(() => document.querySelector('.limit[data-meter="interview_minutes"] [role=progressbar]')?.dataset.level === "high", null, { timeout: 10000 });
  assert.equal(await page.locator('.limit[data-meter="interview_minutes"] [data-f="used"]').textContent(), "95");
  assert.equal(await page.evaluate(() => window.__noReload), true, "the page was not reloaded");

  // --- the entitlements editor changes the bars -------------------------------
  step = "edit plan";
  await page.goto(`${base}/ui/#/customer/acme`);
  await page.waitForFunction(() => document.querySelector("#ent-plan")?.value === "starter");
  await page.getByLabel("Plan", { exact: true }).selectOption("pro");
  await page.getByRole("button", { name: "Save entitlements" }).click();
  await page.getByRole("status").filter({ hasText: "Saved." }).waitFor();
  await page.waitForFunction(() => document.querySelector('.limit[data-meter="interview_minutes"] [data-f="limit"]')?.textContent === "1,000");
  assert.equal(await minutes.getAttribute("data-level"), "ok");
  assert.equal(await row.locator('[data-f="remaining"]').textContent(), "900");
  assert.equal(await page.locator('.limit[data-meter="api_calls"]').count(), 1, "pro has one api_calls limit");
  const unlimited = page.locator('.limit[data-meter="api_calls"] [role=progressbar]');
  assert.equal(await unlimited.getAttribute("aria-valuemax"), null, "an unlimited bar has no maximum");
  assert.match(await unlimited.getAttribute("aria-valuetext"), /used, unlimited$/);
  assert.equal(await page.locator('.limit[data-meter="api_calls"] [data-f="limit"]').textContent(), "∞");
  const saved = await ok("GET", "/v1/customers/acme/entitlements");
  assert.equal(saved.plan, "pro");
  assert.equal(saved.features.recordings, true, "the starter plan's flags were not sent back as the customer's");
  assert.equal(saved.stripe_customer_id, "cus_ACME", "the other fields are kept");
  noErrors("the plan edit");

  // --- an invalid edit: the API's error next to the field ----------------------
  step = "invalid edit";
  await page.getByLabel("Overrides (JSON)").fill('{"interview_minutes": {"limit": 10, "window": "fortnight"}}');
  await page.getByRole("button", { name: "Save entitlements" }).click();
  const overridesError = page.locator("#ent-overrides-error");
  await overridesError.filter({ hasText: "overrides.interview_minutes" }).waitFor();
  assert.match(await overridesError.textContent(), /window/);
  assert.equal(await page.getByLabel("Overrides (JSON)").getAttribute("aria-invalid"), "true");
  assert.equal(await page.locator("#ent-plan-error").textContent(), "", "no error on the plan field");
  assert.equal((await ok("GET", "/v1/customers/acme/entitlements")).overrides.interview_minutes, undefined, "nothing was saved");
  // Not JSON at all: refused before any request.
  await page.getByLabel("Features (JSON)").fill("{sso: yes");
  await page.getByRole("button", { name: "Save entitlements" }).click();
  await page.locator("#ent-features-error").filter({ hasText: "not valid JSON" }).waitFor();
  assert.ok(errors.every((e) => /status of 400/.test(e)), `only the refused PUT is an error: ${errors}`);
  errors.length = 0;

  // --- history ---------------------------------------------------------------
  step = "history page";
  await page.goto(`${base}/ui/#/history`);
  await page.locator('#charts section[data-meter="api_calls"] svg polyline').first().waitFor();
  assert.equal(await page.locator('#charts section[data-meter="api_calls"] polyline').count(), 3, "top customers, one line each");
  await page.getByLabel("Customer").fill("initech");
  await page.getByLabel("Customer").press("Enter");
  await page.getByLabel("Granularity").selectOption("day");
  await page.waitForFunction(() => document.querySelectorAll('#charts section[data-meter="api_calls"] polyline').length === 1);
  await page.getByLabel("Granularity").selectOption("minute");
  await page.locator('#charts section[data-meter="interview_minutes"] polyline').waitFor();
  noErrors("the history page");
  await page.screenshot({ path: join(WORK, "history.png"), fullPage: true });

  // --- system ------------------------------------------------------------------
  step = "system page";
  await page.goto(`${base}/ui/#/system`);
  await page.locator("#readyz", { hasText: "readyz: ready" }).waitFor();
  await page.locator('[data-metric="Events ingested /s"] .value').filter({ hasText: /^\d+\.\d$/ }).waitFor({ timeout: 10000 });
  assert.match(await page.locator('[data-metric="Notifications pending"] .value').textContent(), /^\d+$/);
  assert.match(await page.locator('[data-metric="Check p99"] .value').textContent(), /^\d+\.\d+ ms( \(since start\))?$/);
  noErrors("the system page");
  await page.screenshot({ path: join(WORK, "system.png"), fullPage: true });

  // --- the widget on another origin --------------------------------------------
  step = "widget";
  embedHtml = `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Acme app</title>
<style>body{font-family:sans-serif;margin:24px;max-width:520px} meterd-usage{--meterd-ok:#1b5e20;border:1px solid #ccc;padding:12px;border-radius:8px;margin-bottom:16px}</style>
<script src="${base}/ui/widget.js"></script></head><body>
<h1>Your plan usage</h1>
<meterd-usage id="mine" token="${acmeToken}"></meterd-usage>
<h2>Globex (another theme)</h2>
<meterd-usage id="globex" token="${globexToken}" style="--meterd-track:#d8dee6;--meterd-radius:0"></meterd-usage>
<h2>Someone else's</h2>
<meterd-usage id="other" token="${globexToken}" customer="acme"></meterd-usage>
</body></html>`;
  const embedErrors = [];
  const embed = await context.newPage();
  embed.on("console", (m) => m.type() === "error" && embedErrors.push(m.text()));
  embed.on("pageerror", (e) => embedErrors.push(`page error: ${e.message}`));
  await embed.goto(`http://127.0.0.1:${embedPort}/`);
  const mine = embed.locator("#mine");
  await embed.waitForFunction(() => document.querySelector("#mine").dataset.state === "ready");
  const bars = mine.getByRole("progressbar");
  assert.ok((await bars.count()) >= 3, "one bar per limit");
  const wm = mine.getByRole("progressbar", { name: "interview minutes this month" });
  assert.equal(await wm.getAttribute("aria-valuenow"), "100");
  assert.equal(await wm.getAttribute("aria-valuemax"), "1000");
  assert.match(await wm.getAttribute("aria-valuetext"), /100 of 1,000 used, 900 left/);
  await embed.waitForFunction(() => document.querySelector("#globex").dataset.state === "ready");
  assert.equal(await embed.locator("#globex li.high").getByRole("progressbar").getAttribute("aria-valuenow"), "95", "globex at 95 % is orange");
  await embed.waitForFunction(() => document.querySelector("#other").dataset.state === "error");
  const other = embed.locator("#other");
  assert.equal(await other.getByRole("progressbar").count(), 0, "no data for another customer");
  assert.match(await other.getByRole("alert").textContent(), /another customer/);
  assert.ok(embedErrors.every((e) => /status of 403/.test(e)), `only the refused read is an error: ${embedErrors}`);
  // Themeable: a CSS variable from the host page reaches the shadow root.
  const fill = await wm.locator(".fill").evaluate((el) => getComputedStyle(el).backgroundColor);
  assert.equal(fill, "rgb(27, 94, 32)", "--meterd-ok from the page");
  await wm.focus();
  assert.equal(await embed.evaluate(() => document.activeElement.id), "mine", "focus is inside the widget");
  await embed.evaluate(() => document.activeElement.shadowRoot.activeElement.blur());
  await embed.setViewportSize({ width: 600, height: 400 });
  await embed.screenshot({ path: join(SHOTS, "widget.png"), fullPage: true });
  const size = statSync(join(METERD_ROOT, "ui/widget.js")).size;
  assert.ok(size <= 30 * 1024, `widget.js is ${size} bytes`);

  // --- headers ------------------------------------------------------------------
  step = "headers";
  const index = await fetch(`${base}/ui/`);
  assert.match(index.headers.get("content-security-policy"), /default-src 'none'/);
  assert.equal(index.headers.get("content-type"), "text/html; charset=utf-8");
  const again = await fetch(`${base}/ui/`, { headers: { "if-none-match": index.headers.get("etag") } });
  assert.equal(again.status, 304);
  const pre = await fetch(`${base}/v1/customers/acme/usage`, { method: "OPTIONS", headers: { origin: "http://example.com", "access-control-request-method": "GET", "access-control-request-headers": "authorization" } });
  assert.equal(pre.status, 204);
  assert.equal(pre.headers.get("access-control-allow-origin"), "*");
  assert.equal((await fetch(`${base}/v1/customers`, { method: "OPTIONS" })).status, 405, "only the widget's routes are cross-origin");
  assert.ok(readFileSync(join(SHOTS, "console-customer.png")).length > 10000);
  // --- loopback without keys: no key asked, every call allowed ----------------------
  step = "loopback without keys";
  const probe2 = createServer();
  const openPort = await listen(probe2);
  await new Promise((r) => probe2.close(r));
  const openDir = join(WORK, "open");
  mkdirSync(openDir, { recursive: true });
  writeFileSync(
    join(openDir, "meterd.toml"),
    `[server]\nlisten = "127.0.0.1:${openPort}"\n[storage]\ndata_dir = "${openDir}/data"\n` +
      `[[meters]]\nname = "api_calls"\naggregation = "count"\n` +
      `[[plans]]\nname = "free"\ndefault = true\n[plans.limits]\napi_calls = { limit = 10, window = "day" }\n`,
  );
  openMeterd = spawn(METERD_BIN, ["--config", join(openDir, "meterd.toml")], { env: { ...process.env, RUST_LOG: "error" }, stdio: "ignore" });
  const openBase = `http://127.0.0.1:${openPort}`;
  for (let i = 0; !(await fetch(`${openBase}/healthz`).then((r) => r.ok).catch(() => false)); i++) {
    assert.ok(i < 200 && openMeterd.exitCode === null, "the instance without keys did not start");
    await sleep(50);
  }
  const seeded = await fetch(`${openBase}/v1/events`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(Array.from({ length: 10 }, (_, k) => ({ id: `o${k}`, customer: "solo", meter: "api_calls" }))) });
  assert.equal(seeded.status, 202);
  const fresh = await browser.newContext();
  const openPage = await fresh.newPage();
  const openErrors = [];
  openPage.on("console", (m) => m.type() === "error" && openErrors.push(m.text()));
  await openPage.goto(`${openBase}/ui/#/customer/solo`);
  const solo = openPage.getByRole("progressbar", { name: "api_calls (day)" });
  await solo.waitFor();
  assert.equal(await solo.getAttribute("data-level"), "over");
  assert.equal(await openPage.locator("#banner").isHidden(), true, "no key asked");
  assert.deepEqual(openErrors, [], "console errors without keys");
  await fresh.close();

  log("all console and widget checks passed");
} catch (err) {
  console.error(`[browser] FAILED at ${step}: ${err.stack || err}`);
  await shutdown();
  console.error(`[browser] meterd's log, last lines:\n${meterdOut.split("\n").slice(-40).join("\n")}`);
  process.exit(1);
}
await shutdown();
