// @ts-check
/**
 * The WebCrypto object: `globalThis.crypto` (browsers, edge runtimes, Node ≥ 19),
 * else `node:crypto`'s `webcrypto` (Node 18), loaded by a specifier bundlers
 * for edge runtimes do not follow.
 * @module
 */

/** @returns {Promise<Crypto>} */
async function load() {
  if (globalThis.crypto?.subtle) return globalThis.crypto;
  const spec = "node:crypto";
  const mod = await import(/* webpackIgnore: true */ spec);
  return /** @type {Crypto} */ (mod.webcrypto);
}

/** @type {Crypto} */
export const webcrypto = await load();
