// Node: gateway/member_page/holdercode.js makes, byte for byte, every valid holder code of
// docs/code-vectors.json from the vector's credential, proof fields and the holder key's seed.
// Run by tests/browser/test_holdercode_vectors.py; prints how many it checked.
"use strict";
const fs = require("fs");
const path = require("path");
const { webcrypto } = require("crypto");
const { makeHolderCode } = require(path.join(__dirname, "..", "..", "gateway", "member_page", "holdercode.js"));

const PKCS8_ED25519_PREFIX = Buffer.from("302e020100300506032b657004220420", "hex");
const PURPOSE_NAMES = { 1: "pay", 2: "access", 4: "ride", 8: "check_in" };

async function main() {
  const root = path.join(__dirname, "..", "..");
  const vectors = JSON.parse(fs.readFileSync(path.join(root, "docs", "code-vectors.json"), "utf8"));
  const seed = Buffer.from(vectors.keys.holder.seed, "hex");
  const key = await webcrypto.subtle.importKey("pkcs8", Buffer.concat([PKCS8_ED25519_PREFIX, seed]),
    { name: "Ed25519" }, false, ["sign"]);
  let checked = 0;
  for (const vector of vectors.vectors) {
    if (vector.expected.result !== "VERIFIED" || !vector.binary_hex || !vector.binary_hex.startsWith("0101")) continue;
    const binary = Buffer.from(vector.binary_hex, "hex");
    if (binary.length !== 209 || binary.subarray(22, 54).toString("hex") !== vectors.keys.holder.public_key) continue;
    const view = new DataView(binary.buffer, binary.byteOffset, binary.length);
    const code = await makeHolderCode({
      credential: new Uint8Array(binary.subarray(2, 136)),
      timeS: view.getUint32(136), counter: view.getUint32(140), purpose: PURPOSE_NAMES[binary[144]],
      sign: (message) => webcrypto.subtle.sign({ name: "Ed25519" }, key, message),
      subtle: webcrypto.subtle,
    });
    if (code !== vector.code) {
      console.error("MISMATCH " + vector.name + "\n  made     " + code + "\n  expected " + vector.code);
      process.exit(1);
    }
    checked += 1;
  }
  console.log("checked " + checked);
}

main().catch((error) => { console.error(error); process.exit(2); });
