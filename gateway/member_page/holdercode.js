// The holder code of docs/code-format.md, made in the browser: the credential the issuer signed
// (134 bytes) and a proof {time, counter, purpose} signed with the phone's holder key, as
// "OC1:" + Base45. The same file runs in Node for the format's test vectors
// (tests/browser/holdercode_vectors.js). Nothing here touches the network or storage.
"use strict";
(function (root) {
  const FORMAT_VERSION = 1;
  const KIND_HOLDER = 1;
  const CREDENTIAL_BYTES = 134;
  const HOLDER_CODE_BYTES = 209;
  const PROOF_TAG = new TextEncoder().encode("OC1:PROF");
  const TEXT_PREFIX = "OC1:";
  const BASE45 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:";
  const PURPOSES = { pay: 0x01, access: 0x02, ride: 0x04, check_in: 0x08 };
  const MAX_U32 = 0xffffffff;

  // RFC 9285: each two bytes become three characters, a last odd byte two.
  function base45(bytes) {
    let text = "";
    for (let i = 0; i + 1 < bytes.length; i += 2) {
      let n = bytes[i] * 256 + bytes[i + 1];
      const c = n % 45; n = (n - c) / 45;
      const d = n % 45; const e = (n - d) / 45;
      text += BASE45[c] + BASE45[d] + BASE45[e];
    }
    if (bytes.length % 2 === 1) {
      const n = bytes[bytes.length - 1];
      text += BASE45[n % 45] + BASE45[(n - (n % 45)) / 45];
    }
    return text;
  }

  function proofFields(timeS, counter, purposeBit) {
    for (const [name, value] of [["time_s", timeS], ["counter", counter]]) {
      if (!Number.isInteger(value) || value < 0 || value > MAX_U32) throw new RangeError(name + " is not a uint32");
    }
    const fields = new Uint8Array(9);
    const view = new DataView(fields.buffer);
    view.setUint32(0, timeS);
    view.setUint32(4, counter);
    fields[8] = purposeBit;
    return fields;
  }

  // A fresh holder code. `credential`: the 134 bytes codegen issued; `sign(message)`: the holder
  // key's Ed25519 signature (64 bytes) of the proof message, e.g. WebCrypto with a key that
  // cannot leave the browser; `subtle`: a SubtleCrypto for SHA-256.
  async function makeHolderCode({ credential, timeS, counter, purpose, sign, subtle }) {
    if (!(credential instanceof Uint8Array) || credential.length !== CREDENTIAL_BYTES) {
      throw new RangeError("the credential must be " + CREDENTIAL_BYTES + " bytes");
    }
    const purposeBit = PURPOSES[purpose];
    if (!purposeBit) throw new RangeError("unknown purpose " + purpose);
    if (!(credential[69] & purposeBit)) throw new RangeError("the credential does not allow " + purpose);
    const fields = proofFields(timeS, counter, purposeBit);
    const credentialHash = new Uint8Array(await subtle.digest("SHA-256", credential));
    const message = concat([PROOF_TAG, credentialHash, fields]);
    const signature = new Uint8Array(await sign(message));
    if (signature.length !== 64) throw new RangeError("an Ed25519 signature is 64 bytes");
    const binary = concat([new Uint8Array([FORMAT_VERSION, KIND_HOLDER]), credential, fields, signature]);
    if (binary.length !== HOLDER_CODE_BYTES) throw new RangeError("a holder code is " + HOLDER_CODE_BYTES + " bytes");
    return TEXT_PREFIX + base45(binary);
  }

  function concat(parts) {
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) { out.set(p, at); at += p.length; }
    return out;
  }

  const api = { base45, makeHolderCode, PURPOSES, CREDENTIAL_BYTES };
  root.OnecardHolderCode = api;
  if (typeof module === "object" && module.exports) module.exports = api;
})(typeof globalThis !== "undefined" ? globalThis : this);
