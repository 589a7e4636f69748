/**
 * meterd: a client for the meterd usage-metering daemon (docs/api.md).
 * ESM, no runtime dependencies beyond `fetch` and WebCrypto: Node >= 18,
 * Deno, Bun, Cloudflare Workers, Vercel Edge.
 */

/** Retry policy for 408/429/502/503/504 and network errors. */
export interface RetryOptions {
  /** Attempts in all, the first included. */
  maxAttempts?: number;
  /** The first retry waits about this long (half fixed, half random); each next one twice as long. */
  baseDelayMs?: number;
  /** No wait is longer (except a `Retry-After`, honoured up to 60 s). */
  maxDelayMs?: number;
}

export interface MeterdOptions {
  /** Default `http://127.0.0.1:8480`. */
  baseUrl?: string;
  /** Sent as `Authorization: Bearer <apiKey>`. */
  apiKey?: string;
  /** A fetch implementation (default `globalThis.fetch`). */
  fetch?: typeof fetch;
  /** One attempt's time limit (default 10,000 ms). */
  timeoutMs?: number;
  /** Retries of direct calls (default 3 attempts, 100 ms base, 10 s cap). */
  retry?: RetryOptions;
  /** Retries of background batches and `ingest()` (default 12 attempts, 100 ms base, 10 s cap: about a minute). */
  batchRetry?: RetryOptions;
  /** Send when this many events wait (default 1,000; at most 10,000). */
  batchSize?: number;
  /** Send what waits this long after the first event (default 1,000 ms). */
  flushIntervalMs?: number;
  /** Events the buffer holds, in flight excluded (default 100,000). */
  maxBufferSize?: number;
  /**
   * When `track()` finds the buffer full:
   * - `"drop-oldest"` (default): the oldest waiting event is dropped and given to `onDrop`;
   * - `"block"`: `track()`'s promise resolves when there is room (await it);
   * - `"throw"`: `track()` throws `BufferFullError`.
   */
  onFull?: "drop-oldest" | "block" | "throw";
  /** Events meterd refused for good (invalid, or retries exhausted), with the error. */
  onError?: (error: MeterdError, events: Event[]) => void;
  /** Events dropped by `onFull: "drop-oldest"`. */
  onDrop?: (events: Event[]) => void;
}

/** An event as given to `track()`. */
export interface TrackEvent {
  /** The idempotency key; default a new UUIDv7. */
  id?: string;
  customer: string;
  meter: string;
  /** Default 1. */
  quantity?: number;
  /** Default now (set when tracked). A Date, an RFC 3339 string or Unix milliseconds. */
  timestamp?: Date | string | number;
  properties?: Record<string, string>;
}

/** An event as sent. */
export interface Event {
  id: string;
  customer: string;
  meter: string;
  quantity?: number;
  timestamp: string | number;
  properties?: Record<string, string>;
}

export interface Stats {
  tracked: number;
  /** Events meterd accepted (first time seen). */
  accepted: number;
  /** Events meterd already had (a retry of an acknowledged send). */
  duplicates: number;
  /** Events given up on (see `onError`). */
  failed: number;
  dropped: number;
  batches: number;
  /** Retried attempts (any call). */
  retries: number;
  buffered: number;
  inFlight: number;
}

export interface LimitState {
  window: string;
  limit: number | null;
  used: number;
  held?: number;
  remaining: number | null;
  resets_at: string | null;
  hard: boolean;
}

export interface CheckRequest {
  customer: string;
  meter: string;
  quantity?: number;
  consume?: boolean;
  id?: string;
  /** For `unique_count` meters. */
  value?: string;
}

export interface ConsumeRequest {
  customer: string;
  meter: string;
  quantity?: number;
  /** Default a new UUIDv7 (fixed for this call's retries). */
  id?: string;
  value?: string;
}

export interface CheckResult {
  allowed: boolean;
  customer: string;
  meter: string;
  quantity: number;
  used: number;
  held?: number;
  limit: number | null;
  remaining: number | null;
  window: string | null;
  resets_at: string | null;
  hard: boolean;
  reason:
    | "within_limit"
    | "limit_exceeded"
    | "soft_limit_exceeded"
    | "unlimited"
    | "not_entitled"
    | "insufficient_credits"
    | "unavailable"
    | (string & {});
  limits: LimitState[];
}

export interface ReserveRequest {
  /** Default a new UUIDv7. */
  id?: string;
  customer: string;
  meter: string;
  quantity?: number;
  /** A duration (`"2h"`) or seconds; absent: held until settled or released. */
  expiresIn?: string | number;
}

export interface Reservation {
  id: string;
  customer: string;
  meter: string;
  status: "held" | "denied" | "settled" | "released" | "expired";
  quantity: number;
  expires_at: string | null;
  settled_quantity: number | null;
}

export interface ReserveResult extends CheckResult {
  reservation: Reservation;
}

export interface UsageQuery {
  meter: string;
  from: Date | string | number;
  to: Date | string | number;
  granularity?: "minute" | "hour" | "day";
  customer?: string;
  groupBy?: string;
}

export interface UsageSeries {
  meter: string;
  granularity: string;
  data: { customer: string; start: string; end: string; value: number; group?: Record<string, string | null> }[];
  truncated?: boolean;
}

export interface CustomerUsage {
  customer: string;
  plan: string;
  meters: {
    meter: string;
    window: string;
    used: number;
    held?: number;
    limit: number | null;
    remaining: number | null;
    percent: number | null;
    resets_at: string | null;
    hard: boolean;
  }[];
  features: Record<string, boolean>;
}

export interface Balances {
  customer: string;
  balances: {
    meter: string;
    balance: number;
    granted: number;
    used: number;
    next_expiry: { amount: number; expires_at: string } | null;
  }[];
}

export interface GrantRequest {
  /** Default a new UUIDv7 (pass your own, e.g. a checkout id, to make retries safe across processes). */
  id?: string;
  meter: string;
  amount: number;
  priority?: number;
  effectiveAt?: Date | string;
  expiresAt?: Date | string;
  reason?: string;
}

export interface Grant {
  id: string;
  meter: string;
  amount: number;
  remaining: number;
  priority: number;
  effective_at: string;
  expires_at: string | null;
  status: "active" | "pending" | "expired" | "spent" | "voided";
  reason: string | null;
}

export type LimitSpec =
  | { limit: number | "unlimited" | "credits" | null; window?: string; hard?: boolean; enforcement?: string; low_balance?: number; notify?: number[] };

export interface EntitlementsUpdate {
  plan?: string;
  overrides?: Record<string, LimitSpec | LimitSpec[]>;
  features?: Record<string, boolean>;
  stripe_customer_id?: string | null;
  billing_anchor?: string | null;
}

export interface Entitlements extends EntitlementsUpdate {
  customer: string;
  plan: string;
  limits: Record<string, LimitSpec[]>;
}

export declare class Meterd {
  constructor(options?: MeterdOptions);
  /** Counters since the client was made (a copy). */
  readonly stats: Stats;
  /** Any API call, with the direct-call retries: the parsed JSON answer. */
  request(method: string, path: string, body?: unknown, retry?: Required<RetryOptions>): Promise<any>;
  check(req: CheckRequest): Promise<CheckResult>;
  /** Check and record in one step (`consume: true`). */
  consume(req: ConsumeRequest): Promise<CheckResult>;
  reserve(req: ReserveRequest): Promise<ReserveResult>;
  /** Records the actual quantity (default: the quantity held) and releases the hold. */
  settle(id: string, opts?: { quantity?: number; timestamp?: Date | string | number }): Promise<Reservation>;
  release(id: string): Promise<Reservation>;
  reservation(id: string): Promise<Reservation>;
  /** `GET /v1/usage`: usage over time. */
  usage(query: UsageQuery): Promise<UsageSeries>;
  /** `GET /v1/customers/{c}/usage`: limits, usage and features. */
  customerUsage(customer: string): Promise<CustomerUsage>;
  balances(customer: string): Promise<Balances>;
  grants(customer: string, opts?: { meter?: string }): Promise<Grant[]>;
  createGrant(customer: string, grant: GrantRequest): Promise<Grant>;
  voidGrant(customer: string, id: string): Promise<Grant>;
  entitlements(customer: string): Promise<Entitlements>;
  setEntitlements(customer: string, doc: EntitlementsUpdate): Promise<Entitlements>;
  /** Sends events now (not buffered), with ids and timestamps filled in, retried like batches. */
  ingest(events: TrackEvent[]): Promise<{ accepted: number; duplicates: number }>;
  /**
   * Buffers one event for background sending. Resolves when buffered (at once
   * unless `onFull: "block"` and full); throws `BufferFullError` synchronously
   * under `onFull: "throw"`; throws `MeterdError` (`invalid_event`) at once
   * for an event without customer or meter, or with a bad quantity.
   */
  track(event: TrackEvent): Promise<void>;
  /**
   * Sends every event tracked before the call; rejects with the first permanent
   * failure among them, or with code `timeout` after `timeoutMs` (the events
   * stay buffered and are still sent).
   */
  flush(opts?: { timeoutMs?: number }): Promise<void>;
  /** Flushes; `track()` throws afterwards. */
  close(opts?: { timeoutMs?: number }): Promise<void>;
}

/** The event as it will be sent: id (UUIDv7) and timestamp filled in. */
export declare function normalize(event: TrackEvent): Event;

export declare class MeterdError extends Error {
  constructor(
    message: string,
    init?: { status?: number; code?: string; details?: unknown; retryAfter?: number | null; cause?: unknown },
  );
  /** HTTP status; 0 when no answer was received. */
  readonly status: number;
  /** The API's error code, or `network_error`, `timeout`, `buffer_full`, `closed`. */
  readonly code: string;
  /** The API's `details` (for `invalid_event`: `[{index, field, reason}]`). */
  readonly details: unknown;
  /** Seconds from `Retry-After`, if any. */
  readonly retryAfter: number | null;
  /** Whether the same request may succeed later (429, 503, network). */
  readonly retryable: boolean;
}

export declare class BufferFullError extends MeterdError {
  constructor(size: number);
}

export declare class WebhookVerificationError extends Error {
  constructor(message: string);
}

export type WebhookHeaders = Headers | Record<string, string | string[] | undefined>;

/** Standard Webhooks signatures for one endpoint secret (`whsec_...`). */
export declare class Webhook {
  constructor(secret: string | Uint8Array);
  sign(id: string, timestamp: Date | number, payload: string | Uint8Array): Promise<string>;
  /** Verifies the raw body against the headers (tolerance 5 min) and returns the parsed payload. */
  verify(payload: string | Uint8Array, headers: WebhookHeaders, opts?: { toleranceSeconds?: number; now?: Date }): Promise<any>;
}

export declare function verifyWebhook(
  secret: string | Uint8Array,
  payload: string | Uint8Array,
  headers: WebhookHeaders,
  opts?: { toleranceSeconds?: number; now?: Date },
): Promise<any>;

/** A new UUIDv7. */
export declare function uuidv7(): string;
