// @ts-check
/**
 * UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then random bits, so ids
 * sort by creation time and never repeat. Uses WebCrypto's getRandomValues
 * (globalThis.crypto; on Node 18, node:crypto's webcrypto).
 * @module
 */
import { webcrypto } from "./crypto.js";

const HEX = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, "0"));

/** A new UUIDv7 string. */
export function uuidv7() {
  const b = new Uint8Array(16);
  webcrypto.getRandomValues(b);
  const ms = Date.now();
  const high = Math.floor(ms / 0x100000000);
  const low = ms >>> 0;
  b[0] = (high >>> 8) & 0xff;
  b[1] = high & 0xff;
  b[2] = (low >>> 24) & 0xff;
  b[3] = (low >>> 16) & 0xff;
  b[4] = (low >>> 8) & 0xff;
  b[5] = low & 0xff;
  b[6] = (b[6] & 0x0f) | 0x70;
  b[8] = (b[8] & 0x3f) | 0x80;
  let s = "";
  for (let i = 0; i < 16; i++) {
    s += HEX[b[i]];
    if (i === 3 || i === 5 || i === 7 || i === 9) s += "-";
  }
  return s;
}
