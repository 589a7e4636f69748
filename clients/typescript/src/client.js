// @ts-check
/**
 * The meterd HTTP client: direct calls (check, consume, reservations, usage,
 * balances, grants, entitlements) and `track()`, which buffers events and sends
 * them in the background in batches, retrying with the same ids so a retry is
 * deduplicated by meterd and never counted twice.
 * @module
 */
import { MeterdError, BufferFullError, RETRY_STATUSES } from "./errors.js";
import { uuidv7 } from "./uuid.js";

/** @typedef {import("./index.js").MeterdOptions} MeterdOptions */
/** @typedef {import("./index.js").RetryOptions} RetryOptions */
/** @typedef {import("./index.js").TrackEvent} TrackEvent */
/** @typedef {import("./index.js").Event} Event */
/** @typedef {{seq: number, event: Event}} Entry */

const DEFAULT_RETRY = { maxAttempts: 3, baseDelayMs: 100, maxDelayMs: 10_000 };
const DEFAULT_BATCH_RETRY = { maxAttempts: 12, baseDelayMs: 100, maxDelayMs: 10_000 };
const ON_FULL = new Set(["drop-oldest", "block", "throw"]);

/** @param {number} ms */
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * The delay before retry number `attempt` (1-based): exponential with jitter
 * (half fixed, half random), or the server's `Retry-After` when it is longer.
 * @param {Required<RetryOptions>} retry
 * @param {number} attempt
 * @param {number | null} retryAfter seconds
 */
export function backoff(retry, attempt, retryAfter) {
  const cap = Math.min(retry.maxDelayMs, retry.baseDelayMs * 2 ** (attempt - 1));
  const jittered = cap / 2 + Math.random() * (cap / 2);
  if (retryAfter != null && retryAfter * 1000 > jittered) return Math.min(retryAfter * 1000, 60_000);
  return jittered;
}

/** @param {string | null} value */
function parseRetryAfter(value) {
  if (value == null) return null;
  const secs = Number(value);
  if (Number.isFinite(secs) && secs >= 0) return secs;
  const date = Date.parse(value);
  return Number.isNaN(date) ? null : Math.max(0, (date - Date.now()) / 1000);
}

/** @param {string} s */
const seg = (s) => encodeURIComponent(s);

/** @param {Date | string | number | undefined} t */
function time(t) {
  return t instanceof Date ? t.toISOString() : t;
}

/**
 * A meterd client. One per process is enough: it keeps the buffer of tracked
 * events and one batch in flight at a time.
 */
export class Meterd {
  /** @type {string} */ #base;
  /** @type {string | undefined} */ #apiKey;
  /** @type {typeof fetch} */ #fetch;
  /** @type {number} */ #timeoutMs;
  /** @type {Required<RetryOptions>} */ #retry;
  /** @type {Required<RetryOptions>} */ #batchRetry;
  /** @type {number} */ #batchSize;
  /** @type {number} */ #flushIntervalMs;
  /** @type {number} */ #maxBufferSize;
  /** @type {"drop-oldest" | "block" | "throw"} */ #onFull;
  /** @type {MeterdOptions["onError"]} */ #onError;
  /** @type {MeterdOptions["onDrop"]} */ #onDrop;

  /** Events waiting to be sent, oldest first (from index #head). @type {Entry[]} */ #buffer = [];
  #head = 0;
  /** Events waiting for room under `onFull: "block"`. @type {{entry: Entry, resolve: () => void}[]} */ #blocked = [];
  /** The batch being sent. @type {Entry[]} */ #inFlight = [];
  #seq = 0;
  /** @type {Promise<void> | null} */ #loop = null;
  /** @type {ReturnType<typeof setTimeout> | null} */ #timer = null;
  #drainAll = false;
  #closed = false;
  /** @type {{upTo: number, resolve: () => void}[]} */ #flushWaiters = [];
  /** Permanent failures not yet reported by a flush. @type {{seq: number, error: MeterdError}[]} */ #failures = [];
  #stats = { tracked: 0, accepted: 0, duplicates: 0, failed: 0, dropped: 0, batches: 0, retries: 0 };

  /** @param {MeterdOptions} [options] */
  constructor(options = {}) {
    this.#base = (options.baseUrl ?? "http://127.0.0.1:8480").replace(/\/+$/, "");
    this.#apiKey = options.apiKey;
    const f = options.fetch ?? globalThis.fetch;
    if (typeof f !== "function") throw new TypeError("meterd: no fetch: pass options.fetch (Node >= 18 has one)");
    this.#fetch = f;
    this.#timeoutMs = options.timeoutMs ?? 10_000;
    this.#retry = { ...DEFAULT_RETRY, ...options.retry };
    this.#batchRetry = { ...DEFAULT_BATCH_RETRY, ...options.batchRetry };
    this.#batchSize = options.batchSize ?? 1000;
    this.#flushIntervalMs = options.flushIntervalMs ?? 1000;
    this.#maxBufferSize = options.maxBufferSize ?? 100_000;
    this.#onFull = options.onFull ?? "drop-oldest";
    this.#onError = options.onError;
    this.#onDrop = options.onDrop;
    if (!(Number.isInteger(this.#batchSize) && this.#batchSize >= 1 && this.#batchSize <= 10_000))
      throw new RangeError("meterd: batchSize must be an integer from 1 to 10000");
    if (!(Number.isInteger(this.#maxBufferSize) && this.#maxBufferSize >= 1))
      throw new RangeError("meterd: maxBufferSize must be a positive integer");
    if (!ON_FULL.has(this.#onFull)) throw new RangeError(`meterd: onFull must be one of ${[...ON_FULL].join(", ")}`);
  }

  /** Counters since the client was made (a copy). */
  get stats() {
    return { ...this.#stats, buffered: this.#buffer.length - this.#head + this.#blocked.length, inFlight: this.#inFlight.length };
  }

  // -------------------------------------------------------------------------
  // Direct calls

  /**
   * One API call with retries on 429/503/network errors; the parsed JSON answer.
   * @param {string} method
   * @param {string} path
   * @param {unknown} [body]
   * @param {Required<RetryOptions>} [retry]
   * @returns {Promise<any>}
   */
  async request(method, path, body, retry = this.#retry) {
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.#once(method, path, body);
      } catch (e) {
        const err = /** @type {MeterdError} */ (e);
        if (!(err instanceof MeterdError) || !err.retryable || attempt >= retry.maxAttempts) throw err;
        this.#stats.retries++;
        await sleep(backoff(retry, attempt, err.retryAfter));
      }
    }
  }

  /**
   * @param {string} method
   * @param {string} path
   * @param {unknown} body
   */
  async #once(method, path, body) {
    /** @type {Record<string, string>} */
    const headers = { accept: "application/json" };
    if (this.#apiKey) headers.authorization = `Bearer ${this.#apiKey}`;
    if (body !== undefined) headers["content-type"] = "application/json";
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), this.#timeoutMs);
    let res;
    let text;
    try {
      res = await this.#fetch(this.#base + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: ctl.signal,
      });
      text = await res.text();
    } catch (e) {
      const timedOut = ctl.signal.aborted;
      throw new MeterdError(timedOut ? `meterd: ${method} ${path} timed out after ${this.#timeoutMs} ms` : `meterd: ${method} ${path}: ${/** @type {Error} */ (e)?.message ?? e}`, {
        code: timedOut ? "timeout" : "network_error",
        cause: e,
      });
    } finally {
      clearTimeout(timer);
    }
    /** @type {any} */
    let json = null;
    if (text) {
      try {
        json = JSON.parse(text);
      } catch {
        json = null;
      }
    }
    if (res.ok) return json;
    const err = json?.error;
    throw new MeterdError(err?.message ?? `meterd: ${method} ${path}: HTTP ${res.status}`, {
      status: res.status,
      code: err?.code ?? (RETRY_STATUSES.has(res.status) ? "unavailable" : "http_error"),
      details: err?.details,
      retryAfter: parseRetryAfter(res.headers.get("retry-after")),
    });
  }

  /**
   * Whether `customer` may use `quantity` more of `meter` (nothing recorded
   * unless `consume: true`, which needs an `id`: use {@link consume}).
   * @param {import("./index.js").CheckRequest} req
   * @returns {Promise<import("./index.js").CheckResult>}
   */
  check(req) {
    return this.request("POST", "/v1/check", req);
  }

  /**
   * Check and record in one step: allowed → recorded as an event with `id`
   * (generated when absent; a retry with the same id records nothing more).
   * @param {import("./index.js").ConsumeRequest} req
   * @returns {Promise<import("./index.js").CheckResult>}
   */
  consume(req) {
    return this.request("POST", "/v1/check", { ...req, id: req.id ?? uuidv7(), consume: true });
  }

  /**
   * Holds `quantity` against the customer's limits until settled, released or expired.
   * @param {import("./index.js").ReserveRequest} req
   * @returns {Promise<import("./index.js").ReserveResult>}
   */
  reserve(req) {
    const { expiresIn, ...rest } = req;
    /** @type {Record<string, unknown>} */
    const body = { ...rest, id: req.id ?? uuidv7() };
    if (expiresIn !== undefined) body.expires_in = typeof expiresIn === "number" ? `${expiresIn}s` : expiresIn;
    return this.request("POST", "/v1/reservations", body);
  }

  /**
   * Records the actual quantity (default: the quantity held) and releases the hold.
   * @param {string} id
   * @param {{quantity?: number, timestamp?: Date | string | number}} [opts]
   * @returns {Promise<import("./index.js").Reservation>}
   */
  async settle(id, opts = {}) {
    /** @type {Record<string, unknown>} */
    const body = {};
    if (opts.quantity !== undefined) body.quantity = opts.quantity;
    if (opts.timestamp !== undefined) body.timestamp = time(opts.timestamp);
    return (await this.request("POST", `/v1/reservations/${seg(id)}/settle`, body)).reservation;
  }

  /**
   * Releases a hold without recording usage.
   * @param {string} id
   * @returns {Promise<import("./index.js").Reservation>}
   */
  async release(id) {
    return (await this.request("POST", `/v1/reservations/${seg(id)}/release`, {})).reservation;
  }

  /**
   * @param {string} id
   * @returns {Promise<import("./index.js").Reservation>}
   */
  async reservation(id) {
    return (await this.request("GET", `/v1/reservations/${seg(id)}`)).reservation;
  }

  /**
   * Usage over time (`GET /v1/usage`).
   * @param {import("./index.js").UsageQuery} q
   * @returns {Promise<import("./index.js").UsageSeries>}
   */
  usage(q) {
    const p = new URLSearchParams();
    p.set("meter", q.meter);
    p.set("from", String(time(q.from)));
    p.set("to", String(time(q.to)));
    if (q.granularity) p.set("granularity", q.granularity);
    if (q.customer !== undefined) p.set("customer", q.customer);
    if (q.groupBy !== undefined) p.set("group_by", q.groupBy);
    return this.request("GET", `/v1/usage?${p}`);
  }

  /**
   * A customer's limits, usage and features (`GET /v1/customers/{c}/usage`).
   * @param {string} customer
   * @returns {Promise<import("./index.js").CustomerUsage>}
   */
  customerUsage(customer) {
    return this.request("GET", `/v1/customers/${seg(customer)}/usage`);
  }

  /**
   * @param {string} customer
   * @returns {Promise<import("./index.js").Balances>}
   */
  balances(customer) {
    return this.request("GET", `/v1/customers/${seg(customer)}/balances`);
  }

  /**
   * @param {string} customer
   * @param {{meter?: string}} [opts]
   * @returns {Promise<import("./index.js").Grant[]>}
   */
  async grants(customer, opts = {}) {
    const q = opts.meter === undefined ? "" : `?meter=${seg(opts.meter)}`;
    return (await this.request("GET", `/v1/customers/${seg(customer)}/grants${q}`)).grants;
  }

  /**
   * Grants credits (scope `admin`); the same `id` again changes nothing.
   * @param {string} customer
   * @param {import("./index.js").GrantRequest} grant
   * @returns {Promise<import("./index.js").Grant>}
   */
  createGrant(customer, grant) {
    const { effectiveAt, expiresAt, ...rest } = grant;
    /** @type {Record<string, unknown>} */
    const body = { ...rest, id: grant.id ?? uuidv7() };
    if (effectiveAt !== undefined) body.effective_at = time(effectiveAt);
    if (expiresAt !== undefined) body.expires_at = time(expiresAt);
    return this.request("POST", `/v1/customers/${seg(customer)}/grants`, body);
  }

  /**
   * Voids the unspent remainder of a grant (scope `admin`).
   * @param {string} customer
   * @param {string} id
   * @returns {Promise<import("./index.js").Grant>}
   */
  voidGrant(customer, id) {
    return this.request("DELETE", `/v1/customers/${seg(customer)}/grants/${seg(id)}`);
  }

  /**
   * @param {string} customer
   * @returns {Promise<import("./index.js").Entitlements>}
   */
  entitlements(customer) {
    return this.request("GET", `/v1/customers/${seg(customer)}/entitlements`);
  }

  /**
   * Replaces a customer's entitlements (scope `admin`).
   * @param {string} customer
   * @param {import("./index.js").EntitlementsUpdate} doc
   * @returns {Promise<import("./index.js").Entitlements>}
   */
  setEntitlements(customer, doc) {
    return this.request("PUT", `/v1/customers/${seg(customer)}/entitlements`, doc);
  }

  /**
   * Sends events now (not through the buffer), filling in ids and timestamps,
   * retrying like the background batches.
   * @param {TrackEvent[]} events
   * @returns {Promise<{accepted: number, duplicates: number}>}
   */
  ingest(events) {
    return this.request("POST", "/v1/events", events.map(normalize), this.#batchRetry);
  }

  // -------------------------------------------------------------------------
  // Background batching

  /**
   * Buffers one event; it is sent in the background when `batchSize` events
   * are waiting or `flushIntervalMs` after the first one. The id (UUIDv7) and
   * timestamp are set now when absent, so every retry is the same event.
   *
   * Returns a promise that resolves once the event is in the buffer: at once,
   * except under `onFull: "block"` with a full buffer. Under `onFull: "throw"`
   * a full buffer throws {@link BufferFullError} synchronously. Under
   * `"drop-oldest"` (the default) the oldest waiting event is dropped
   * (`onDrop`, `stats.dropped`).
   * @param {TrackEvent} event
   * @returns {Promise<void>}
   */
  track(event) {
    if (this.#closed) throw new MeterdError("meterd: track() after close()", { code: "closed" });
    const entry = { seq: ++this.#seq, event: normalize(event) };
    this.#stats.tracked++;
    if (this.#blocked.length > 0 || this.#buffered() >= this.#maxBufferSize) {
      if (this.#onFull === "throw") {
        this.#stats.tracked--;
        throw new BufferFullError(this.#maxBufferSize);
      }
      if (this.#onFull === "block") {
        this.#kick(true);
        return new Promise((resolve) => this.#blocked.push({ entry, resolve }));
      }
      const dropped = /** @type {Entry} */ (this.#buffer[this.#head]);
      this.#buffer[this.#head++] = /** @type {any} */ (undefined);
      this.#stats.dropped++;
      this.#onDrop?.([dropped.event]);
      this.#settle();
    }
    this.#buffer.push(entry);
    this.#schedule();
    return Promise.resolve();
  }

  /**
   * Sends every event tracked before this call; resolves when each is
   * acknowledged by meterd, or rejects with the first {@link MeterdError} of
   * the events that could not be sent (each also went to `onError`), or with
   * code `timeout` after `timeoutMs` (the events stay buffered and are still sent).
   * @param {{timeoutMs?: number}} [opts]
   * @returns {Promise<void>}
   */
  async flush(opts = {}) {
    const upTo = this.#seq;
    if (this.#pendingMin() <= upTo) {
      /** @type {ReturnType<typeof setTimeout> | undefined} */
      let timer;
      /** @type {{upTo: number, resolve: () => void}} */
      const waiter = { upTo, resolve: () => {} };
      const done = new Promise((resolve) => {
        waiter.resolve = () => resolve(undefined);
        this.#flushWaiters.push(waiter);
        this.#kick(true);
      });
      const limit =
        opts.timeoutMs === undefined
          ? null
          : new Promise((_, reject) => {
              timer = setTimeout(() => {
                this.#flushWaiters = this.#flushWaiters.filter((w) => w !== waiter);
                reject(new MeterdError(`meterd: flush() timed out after ${opts.timeoutMs} ms`, { code: "timeout" }));
              }, opts.timeoutMs);
            });
      try {
        await (limit ? Promise.race([done, limit]) : done);
      } finally {
        clearTimeout(timer);
      }
    }
    const failed = this.#failures.filter((f) => f.seq <= upTo);
    this.#failures = this.#failures.filter((f) => f.seq > upTo);
    if (failed.length > 0) throw failed[0].error;
  }

  /**
   * Flushes and stops: `track()` throws afterwards. Call it (or `flush()`)
   * before a serverless function returns.
   * @param {{timeoutMs?: number}} [opts]
   * @returns {Promise<void>}
   */
  async close(opts = {}) {
    this.#closed = true;
    try {
      await this.flush(opts);
    } finally {
      if (this.#timer) clearTimeout(this.#timer);
      this.#timer = null;
    }
  }

  #buffered() {
    return this.#buffer.length - this.#head;
  }

  /** The smallest seq not yet settled (Infinity when everything is). */
  #pendingMin() {
    const inFlight = this.#inFlight[0]?.seq ?? Infinity;
    const buffered = this.#buffer[this.#head]?.seq ?? Infinity;
    const blocked = this.#blocked[0]?.entry.seq ?? Infinity;
    return Math.min(inFlight, buffered, blocked);
  }

  #schedule() {
    if (this.#buffered() >= this.#batchSize) this.#kick(false);
    else if (!this.#timer && !this.#loop) {
      this.#timer = setTimeout(() => {
        this.#timer = null;
        this.#kick(true);
      }, this.#flushIntervalMs);
    }
  }

  /** @param {boolean} drainAll send partial batches too */
  #kick(drainAll) {
    if (drainAll) this.#drainAll = true;
    if (this.#loop) return;
    if (this.#timer) {
      clearTimeout(this.#timer);
      this.#timer = null;
    }
    this.#loop = this.#run().finally(() => {
      this.#loop = null;
      // A flush that came while the loop was ending set #drainAll after it.
      if (this.#drainAll && this.#buffered() + this.#blocked.length > 0) this.#kick(true);
      else if (this.#buffered() > 0) this.#schedule();
    });
  }

  async #run() {
    while (this.#buffered() >= this.#batchSize || (this.#drainAll && this.#buffered() > 0)) {
      const end = Math.min(this.#buffer.length, this.#head + this.#batchSize);
      this.#inFlight = this.#buffer.slice(this.#head, end);
      this.#head = end;
      if (this.#head > 4096 && this.#head * 2 > this.#buffer.length) {
        this.#buffer = this.#buffer.slice(this.#head);
        this.#head = 0;
      }
      this.#admitBlocked();
      await this.#send(this.#inFlight);
      this.#inFlight = [];
      this.#settle();
    }
    this.#drainAll = false;
    this.#settle();
  }

  /** Moves blocked events into the buffer as room frees. */
  #admitBlocked() {
    while (this.#blocked.length > 0 && this.#buffered() < this.#maxBufferSize) {
      const b = /** @type {{entry: Entry, resolve: () => void}} */ (this.#blocked.shift());
      this.#buffer.push(b.entry);
      b.resolve();
    }
  }

  /** Resolves the flushes whose events are all settled. */
  #settle() {
    const min = this.#pendingMin();
    this.#flushWaiters = this.#flushWaiters.filter((w) => {
      if (w.upTo < min) {
        w.resolve();
        return false;
      }
      return true;
    });
  }

  /**
   * Sends one batch until acknowledged or failed for good. Invalid events
   * (a 400 `invalid_event` names them) are dropped and the rest re-sent;
   * a batch over the server's size limit (413) is sent in halves.
   * @param {Entry[]} batch
   */
  async #send(batch) {
    if (batch.length === 0) return;
    try {
      const r = await this.request("POST", "/v1/events", batch.map((e) => e.event), this.#batchRetry);
      this.#stats.batches++;
      this.#stats.accepted += r?.accepted ?? 0;
      this.#stats.duplicates += r?.duplicates ?? 0;
    } catch (e) {
      const err =
        e instanceof MeterdError ? e : new MeterdError(`meterd: ${/** @type {Error} */ (e)?.message ?? e}`, { cause: e });
      if (err.code === "invalid_event" && Array.isArray(err.details) && err.details.length > 0) {
        const bad = new Set(err.details.map((/** @type {any} */ d) => d?.index).filter(Number.isInteger));
        if (bad.size > 0) {
          this.#fail(
            err,
            batch.filter((_, i) => bad.has(i)),
          );
          await this.#send(batch.filter((_, i) => !bad.has(i)));
          return;
        }
      }
      if (err.status === 413 && batch.length > 1) {
        const half = Math.ceil(batch.length / 2);
        await this.#send(batch.slice(0, half));
        await this.#send(batch.slice(half));
        return;
      }
      this.#fail(err, batch);
    }
  }

  /**
   * @param {MeterdError} error
   * @param {Entry[]} entries
   */
  #fail(error, entries) {
    if (entries.length === 0) return;
    this.#stats.failed += entries.length;
    this.#failures.push({ seq: entries[0].seq, error });
    try {
      this.#onError?.(
        error,
        entries.map((e) => e.event),
      );
    } catch {
      // a throwing handler must not stop the sender
    }
  }
}

/**
 * The event as sent: the id and timestamp fixed now, so that every retry
 * carries the same ones.
 * @param {TrackEvent} ev
 * @returns {Event}
 */
export function normalize(ev) {
  if (ev == null || typeof ev !== "object") throw new MeterdError("meterd: an event must be an object", { code: "invalid_event" });
  if (typeof ev.customer !== "string" || ev.customer.length === 0)
    throw new MeterdError("meterd: customer: must be a non-empty string", { code: "invalid_event", details: [{ index: 0, field: "customer", reason: "must be a non-empty string" }] });
  if (typeof ev.meter !== "string" || ev.meter.length === 0)
    throw new MeterdError("meterd: meter: must be a non-empty string", { code: "invalid_event", details: [{ index: 0, field: "meter", reason: "must be a non-empty string" }] });
  if (ev.quantity !== undefined && !(typeof ev.quantity === "number" && Number.isFinite(ev.quantity) && ev.quantity >= 0))
    throw new MeterdError("meterd: quantity: must be a finite number, not negative", { code: "invalid_event", details: [{ index: 0, field: "quantity", reason: "must be a finite number, not negative" }] });
  /** @type {Event} */
  const out = {
    id: ev.id ?? uuidv7(),
    customer: ev.customer,
    meter: ev.meter,
    timestamp: time(ev.timestamp) ?? Date.now(),
  };
  if (ev.quantity !== undefined) out.quantity = ev.quantity;
  if (ev.properties !== undefined) out.properties = ev.properties;
  return out;
}
