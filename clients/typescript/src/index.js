// @ts-check
/**
 * meterd: a client for the meterd usage-metering daemon. Types: index.d.ts.
 * @module
 */
export { Meterd, normalize } from "./client.js";
export { MeterdError, BufferFullError, WebhookVerificationError } from "./errors.js";
export { Webhook, verifyWebhook } from "./webhooks.js";
export { uuidv7 } from "./uuid.js";
