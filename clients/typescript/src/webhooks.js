// @ts-check
/**
 * Verifying meterd's notifications (Standard Webhooks): `webhook-signature` is
 * `v1,` + base64 HMAC-SHA256 of `"{webhook-id}.{webhook-timestamp}.{body}"`
 * under the endpoint's key (the secret is `whsec_` + base64 of the key).
 * The signature is checked with WebCrypto's `subtle.verify` (constant time),
 * and the timestamp must be within the tolerance (default 5 minutes) of now.
 * @module
 */
import { webcrypto } from "./crypto.js";
import { WebhookVerificationError } from "./errors.js";

const enc = new TextEncoder();

/** @param {string} b64 */
function fromBase64(b64) {
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(b64)) throw new WebhookVerificationError("not base64");
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/** @param {Uint8Array} bytes */
function toBase64(bytes) {
  let bin = "";
  for (let i = 0; i < bytes.length; i++) bin += String.fromCharCode(bytes[i]);
  return btoa(bin);
}

/**
 * @param {Headers | Record<string, string | string[] | undefined>} headers
 * @param {string} name lower case
 */
function header(headers, name) {
  if (typeof (/** @type {any} */ (headers).get) === "function") return /** @type {Headers} */ (headers).get(name) ?? undefined;
  for (const [k, v] of Object.entries(headers)) {
    if (k.toLowerCase() === name) return Array.isArray(v) ? v.join(" ") : v;
  }
  return undefined;
}

/** Verifies (and makes) Standard Webhooks signatures for one endpoint secret. */
export class Webhook {
  /** @type {Promise<CryptoKey>} */ #key;

  /** @param {string | Uint8Array} secret `whsec_...` (base64 key), or the raw key bytes */
  constructor(secret) {
    let raw;
    if (typeof secret === "string") {
      raw = fromBase64(secret.startsWith("whsec_") ? secret.slice("whsec_".length) : secret);
    } else {
      raw = secret;
    }
    if (raw.length === 0) throw new WebhookVerificationError("the webhook secret is empty");
    this.#key = webcrypto.subtle.importKey("raw", raw, { name: "HMAC", hash: "SHA-256" }, false, ["sign", "verify"]);
  }

  /**
   * The `webhook-signature` value for a message (`v1,<base64>`).
   * @param {string} id
   * @param {Date | number} timestamp a Date or Unix seconds
   * @param {string | Uint8Array} payload
   */
  async sign(id, timestamp, payload) {
    const ts = timestamp instanceof Date ? Math.floor(timestamp.getTime() / 1000) : Math.floor(timestamp);
    const mac = await webcrypto.subtle.sign("HMAC", await this.#key, signed(id, ts, payload));
    return `v1,${toBase64(new Uint8Array(mac))}`;
  }

  /**
   * Checks the headers against the raw body (exactly as received) and returns
   * the parsed JSON payload; throws {@link WebhookVerificationError} otherwise.
   * @param {string | Uint8Array} payload
   * @param {Headers | Record<string, string | string[] | undefined>} headers
   * @param {{toleranceSeconds?: number, now?: Date}} [opts]
   * @returns {Promise<any>}
   */
  async verify(payload, headers, opts = {}) {
    const id = header(headers, "webhook-id");
    const tsText = header(headers, "webhook-timestamp");
    const sigs = header(headers, "webhook-signature");
    if (!id || !tsText || !sigs) throw new WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature");
    if (!/^\d{1,15}$/.test(tsText)) throw new WebhookVerificationError("webhook-timestamp is not Unix seconds");
    const ts = Number(tsText);
    const now = Math.floor((opts.now ?? new Date()).getTime() / 1000);
    const tolerance = opts.toleranceSeconds ?? 300;
    if (ts < now - tolerance) throw new WebhookVerificationError("message timestamp too old");
    if (ts > now + tolerance) throw new WebhookVerificationError("message timestamp too new");
    const data = signed(id, ts, payload);
    const key = await this.#key;
    for (const part of sigs.split(" ")) {
      const comma = part.indexOf(",");
      if (comma < 0 || part.slice(0, comma) !== "v1") continue;
      let mac;
      try {
        mac = fromBase64(part.slice(comma + 1));
      } catch {
        continue;
      }
      if (mac.length === 32 && (await webcrypto.subtle.verify("HMAC", key, mac, data))) {
        const text = typeof payload === "string" ? payload : new TextDecoder().decode(payload);
        try {
          return JSON.parse(text);
        } catch {
          throw new WebhookVerificationError("the payload is not JSON");
        }
      }
    }
    throw new WebhookVerificationError("no matching signature");
  }
}

/**
 * @param {string} id
 * @param {number} ts
 * @param {string | Uint8Array} payload
 */
function signed(id, ts, payload) {
  const head = enc.encode(`${id}.${ts}.`);
  const body = typeof payload === "string" ? enc.encode(payload) : payload;
  const out = new Uint8Array(head.length + body.length);
  out.set(head, 0);
  out.set(body, head.length);
  return out;
}

/**
 * One-call form of {@link Webhook.verify}.
 * @param {string | Uint8Array} secret
 * @param {string | Uint8Array} payload
 * @param {Headers | Record<string, string | string[] | undefined>} headers
 * @param {{toleranceSeconds?: number, now?: Date}} [opts]
 */
export function verifyWebhook(secret, payload, headers, opts) {
  return new Webhook(secret).verify(payload, headers, opts);
}
