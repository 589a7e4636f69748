// @ts-check
/**
 * Errors thrown by the meterd client. Every failed API call rejects with a
 * {@link MeterdError} carrying the API's `code` and `details`
 * (`{"error": {"code", "message", "details"}}`); transport failures use
 * status 0 and the codes `network_error` or `timeout`.
 * @module
 */

/** An error answered by meterd, or a failure to reach it. */
export class MeterdError extends Error {
  /**
   * @param {string} message
   * @param {{status?: number, code?: string, details?: unknown, retryAfter?: number | null, cause?: unknown}} [init]
   */
  constructor(message, init = {}) {
    super(message, init.cause === undefined ? undefined : { cause: init.cause });
    this.name = "MeterdError";
    /** HTTP status; 0 when no answer was received. */
    this.status = init.status ?? 0;
    /** The API's error code (`invalid_event`, `rate_limited`, ...), or `network_error`, `timeout`, `buffer_full`, `closed`. */
    this.code = init.code ?? "unknown";
    /** The API's `details` (for `invalid_event`: `[{index, field, reason}]`), if any. */
    this.details = init.details;
    /** Seconds from a `Retry-After` header, if any. */
    this.retryAfter = init.retryAfter ?? null;
  }

  /** Whether retrying the same request may succeed (429, 503, network). */
  get retryable() {
    return this.status === 0 ? this.code === "network_error" || this.code === "timeout" : RETRY_STATUSES.has(this.status);
  }
}

/** Statuses that are retried: the request may succeed later unchanged. */
export const RETRY_STATUSES = new Set([408, 429, 502, 503, 504]);

/** `track()` found the buffer full under `onFull: "throw"`. */
export class BufferFullError extends MeterdError {
  /** @param {number} size */
  constructor(size) {
    super(`the event buffer is full (${size} events)`, { code: "buffer_full" });
    this.name = "BufferFullError";
  }
}

/** A webhook whose signature or timestamp does not verify. */
export class WebhookVerificationError extends Error {
  /** @param {string} message */
  constructor(message) {
    super(message);
    this.name = "WebhookVerificationError";
  }
}
