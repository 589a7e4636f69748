// Starts the real meterd binary for the tests: a config written to a temp
// dir (listen on a free loopback port, data_dir inside), one all-scopes API
// key, SIGKILL and restart on the same port and data dir. The binary is
// $METERD_BIN or target/debug/meterd of this repository; without it the
// tests fail (build it with `cargo build`).
import { spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { createServer } from "node:net";
import { mkdtempSync, writeFileSync, openSync, readFileSync, existsSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const BIN = process.env.METERD_BIN ?? resolve(here, "../../../target/debug/meterd");

/** The meters and plans every test uses; `tokens` is the tracked meter. */
export const METERS_AND_PLANS = `
[[meters]]
name = "tokens"
aggregation = "sum"

[[meters]]
name = "interview_minutes"
aggregation = "sum"
precision = 2

[[meters]]
name = "interviews"
aggregation = "count"

[[meters]]
name = "ai_credits"
aggregation = "sum"

[[plans]]
name = "starter"
default = true
features = { advanced_analytics = false }
[plans.limits]
tokens = { limit = "unlimited", window = "month" }
interview_minutes = { limit = 300, window = "total" }
interviews = { limit = 3, window = "total" }
ai_credits = { limit = "credits", low_balance = 10 }

[[plans]]
name = "premium"
features = { advanced_analytics = true }
[plans.limits]
tokens = { limit = "unlimited", window = "month" }
interview_minutes = { limit = "unlimited" }
interviews = { limit = "unlimited" }
`;

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A loopback port free right now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

export class MeterdProcess {
  /** @param {{extra?: string, env?: Record<string, string>}} [opts] extra TOML appended to the config; environment */
  static async start(opts = {}) {
    if (!existsSync(BIN)) throw new Error(`no meterd binary at ${BIN}: run \`cargo build\` first (or set METERD_BIN)`);
    const m = new MeterdProcess();
    m.dir = mkdtempSync(join(tmpdir(), "meterd-ts-"));
    m.port = await freePort();
    m.apiKey = `key-${randomBytes(12).toString("hex")}`;
    m.limitedKey = `limited-${randomBytes(12).toString("hex")}`;
    const sha = createHash("sha256").update(m.apiKey).digest("hex");
    const limitedSha = createHash("sha256").update(m.limitedKey).digest("hex");
    m.config = join(m.dir, "meterd.toml");
    writeFileSync(
      m.config,
      `[server]\nlisten = "127.0.0.1:${m.port}"\n\n[storage]\ndata_dir = "${join(m.dir, "data")}"\n` +
        METERS_AND_PLANS +
        `\n[[auth.keys]]\nname = "all"\nkey_sha256 = "${sha}"\nscopes = ["ingest", "check", "read", "admin"]\n` +
        `\n[[auth.keys]]\nname = "limited"\nkey_sha256 = "${limitedSha}"\nscopes = ["ingest"]\nrate_limit_per_second = 1\nrate_limit_burst = 1\n` +
        (opts.extra ?? ""),
    );
    m.log = join(m.dir, "meterd.log");
    m.env = opts.env ?? {};
    await m.restart();
    return m;
  }

  get url() {
    return `http://127.0.0.1:${this.port}`;
  }

  /** Starts the process (again) on the same port and data dir; waits for /healthz. */
  async restart() {
    const out = openSync(this.log, "a");
    const env = { ...process.env, ...this.env };
    delete env.METERD_LISTEN;
    delete env.METERD_CONFIG;
    this.child = spawn(BIN, ["--config", this.config], { stdio: ["ignore", out, out], env });
    this.exited = new Promise((r) => this.child.once("exit", (code, signal) => r({ code, signal })));
    const deadline = Date.now() + 20_000;
    for (;;) {
      if (this.child.exitCode !== null || this.child.signalCode !== null)
        throw new Error(`meterd exited early; log:\n${this.logText()}`);
      try {
        const r = await fetch(`${this.url}/healthz`);
        if (r.status === 200) return;
      } catch {
        // not listening yet
      }
      if (Date.now() > deadline) throw new Error(`meterd never became healthy; log:\n${this.logText()}`);
      await sleep(25);
    }
  }

  /** SIGKILL, and wait for the exit. */
  async kill() {
    this.child.kill("SIGKILL");
    await this.exited;
  }

  logText() {
    try {
      return readFileSync(this.log, "utf8");
    } catch {
      return "";
    }
  }

  /** Stops the process (SIGKILL) and removes the temp dir. */
  async stop() {
    if (this.child && this.child.exitCode === null && this.child.signalCode === null) await this.kill();
    rmSync(this.dir, { recursive: true, force: true });
  }

  /** An authorized raw fetch (for reading what meterd holds, independently of the client). */
  async get(path) {
    const r = await fetch(this.url + path, { headers: { authorization: `Bearer ${this.apiKey}` } });
    const body = await r.json();
    if (r.status !== 200) throw new Error(`GET ${path}: ${r.status} ${JSON.stringify(body)}`);
    return body;
  }

  /** The total of `meter` over every customer, from /v1/usage (store + unflushed). */
  async total(meter) {
    const day = 86_400_000;
    const from = new Date(Date.now() - 2 * day).toISOString();
    const to = new Date(Date.now() + 2 * day).toISOString();
    const body = await this.get(`/v1/usage?meter=${meter}&from=${from}&to=${to}&granularity=day`);
    return body.data.reduce((s, row) => s + row.value, 0);
  }
}
