// Envelope hashes checked in the browser: sha256 over the RFC 8785 (JCS) form of the
// envelope without its "hash" member, as docs/api.md describes.
//
// JCS serialises numbers and strings exactly as ECMAScript's JSON.stringify does and
// sorts object members by UTF-16 code units, which is how Array.prototype.sort compares
// strings; so JCS here is a key sort plus JSON.stringify. Integers beyond 2^53 would lose
// precision in JSON.parse, but the API refuses those (not_canonicalizable).

export function canonicalize(value) {
  if (value === null || typeof value !== "object") return JSON.stringify(value);
  if (Array.isArray(value)) return `[${value.map(canonicalize).join(",")}]`;
  const keys = Object.keys(value).sort();
  return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalize(value[k])}`).join(",")}}`;
}

/** true/false, or null when this page cannot hash (WebCrypto needs https or localhost). */
export async function verifyEnvelope(raw) {
  if (!globalThis.crypto || !crypto.subtle) return null;
  const body = JSON.parse(raw);
  const claimed = body.hash;
  delete body.hash;
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(canonicalize(body)));
  const hex = [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
  return claimed === `sha256:${hex}`;
}
