// The member code page (docs/partners.md, "Member code page").
//
// 1. The partner's app opens /m/#<tenant_id>.<secret>. The secret is traded once at POST /v1/code-page/sessions
//    for a member token, and taken out of the address bar at once.
// 2. Holder mode, where WebCrypto has Ed25519: the page makes the holder key non-extractable (no
//    script, this one included, can read the private half), keeps the CryptoKey in IndexedDB and
//    sends only the public half to get a credential. Every code is then made here, offline:
//    the credential plus a proof signed with that key (holdercode.js).
//    Token mode, where it has not: the page fetches a batch of issuer-signed rotating tokens
//    (24 h, one per minute) and shows the one for the current minute.
// 3. Online, it shows balances and the last payments (and keeps them, to show as "last known"),
//    and lets the member report their card lost. It calls the same REST API as every partner.
"use strict";
(function () {
  const DB_NAME = "onecard-member-page";
  const STORE = "state";
  const PURPOSE = "pay";
  // A fresh holder code this often; a verifier accepts a proof up to 90 s old.
  const HOLDER_CODE_REFRESH_S = 20;
  // Get a new credential (or batch) when the one held has less left than this, if online.
  const RENEW_BEFORE_S = 6 * 3600;
  const CREDENTIAL_VALIDITY_S = 72 * 3600;
  const HISTORY_ITEMS = 8;

  const $ = (id) => document.getElementById(id);
  let state = {};          // what IndexedDB holds, mirrored
  let shownUntilS = 0;     // when the code on screen is replaced
  let nextCodeBusy = false;

  // --- storage -------------------------------------------------------------------------------

  function openDb() {
    return new Promise((resolve, reject) => {
      const request = indexedDB.open(DB_NAME, 1);
      request.onupgradeneeded = () => request.result.createObjectStore(STORE);
      request.onsuccess = () => resolve(request.result);
      request.onerror = () => reject(request.error);
    });
  }

  async function withStore(mode, work) {
    const db = await openDb();
    try {
      return await new Promise((resolve, reject) => {
        const tx = db.transaction(STORE, mode);
        const result = work(tx.objectStore(STORE));
        tx.oncomplete = () => resolve(result && "result" in result ? result.result : undefined);
        tx.onerror = () => reject(tx.error);
      });
    } finally {
      db.close();
    }
  }

  async function load() {
    const keys = ["member", "session", "holderKey", "credential", "counter", "batch", "wallet"];
    const values = {};
    for (const key of keys) values[key] = await withStore("readonly", (s) => s.get(key));
    return values;
  }

  async function save(values) {
    Object.assign(state, values);
    await withStore("readwrite", (s) => { for (const [k, v] of Object.entries(values)) s.put(v, k); });
  }

  async function forgetAll() {
    state = {};
    await withStore("readwrite", (s) => s.clear());
  }

  // --- the API, as every partner calls it ----------------------------------------------------

  class Problem extends Error {
    constructor(status, body) {
      super((body && body.detail) || "the server refused (" + status + ")");
      this.status = status;
      this.reason = body && body.reason;
    }
  }

  async function api(path, { method = "GET", body, token } = {}) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (token) headers.Authorization = "Bearer " + token;
    const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body),
                                         cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer" });
    const text = await response.text();
    const data = text ? JSON.parse(text) : null;
    if (!response.ok) throw new Problem(response.status, data);
    return data;
  }

  function sessionToken() {
    const s = state.session;
    return s && s.expires_at_ms > Date.now() ? s.access_token : null;
  }

  function memberPath(suffix) {
    return "/v1/tenants/" + encodeURIComponent(state.member.tenant_id) + "/members/" +
      encodeURIComponent(state.member.member_id) + suffix;
  }

  async function memberApi(suffix, options = {}) {
    const token = sessionToken();
    if (!token) throw new Problem(401, { reason: "SESSION_ENDED", detail: "open the code page from your app again "
                                                                           + "to see balances" });
    try {
      return await api(suffix.startsWith("/v1/") ? suffix : memberPath(suffix), { ...options, token });
    } catch (error) {
      if (error instanceof Problem && error.status === 401) await save({ session: null });
      throw error;
    }
  }

  // --- the link ------------------------------------------------------------------------------

  async function redeemLink(fragment) {
    // Out of the address bar (and so out of history and any later Referer) before anything else.
    history.replaceState(null, "", location.pathname);
    const dot = fragment.indexOf(".");
    const session = await api("/v1/code-page/sessions", { method: "POST", body: {
      tenant_id: fragment.slice(0, dot), link_secret: fragment.slice(dot + 1) } });
    const member = { tenant_id: session.tenant_id, member_id: session.member_id };
    if (!state.member || state.member.member_id !== member.member_id || state.member.tenant_id !== member.tenant_id) {
      await forgetAll();  // another member on this phone: nothing of the previous one stays
    }
    await save({ member, session: { access_token: session.access_token,
                                    expires_at_ms: Date.now() + (session.expires_in - 30) * 1000 } });
  }

  // --- codes ---------------------------------------------------------------------------------

  async function ed25519Available() {
    if (!window.isSecureContext || !crypto.subtle) return false;
    try {
      await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
      return true;
    } catch (unsupported) {
      return false;
    }
  }

  function b64(bytes) {
    let text = "";
    for (const b of new Uint8Array(bytes)) text += String.fromCharCode(b);
    return btoa(text);
  }

  function unb64(text) {
    return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  }

  const nowS = () => Math.floor(Date.now() / 1000);
  const secondsLeft = (iso) => Math.floor((Date.parse(iso) - Date.now()) / 1000);

  async function ensureHolderCredential() {
    if (!state.holderKey) {
      // Non-extractable: the private key can sign, never be exported, not even by this page.
      const pair = await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
      await save({ holderKey: pair, credential: null, counter: 0 });
    }
    const held = state.credential;
    if (held && secondsLeft(held.not_after) > RENEW_BEFORE_S) return;
    if (!sessionToken()) return;
    const publicKey = await crypto.subtle.exportKey("raw", state.holderKey.publicKey);
    const issued = await memberApi("/credentials", { method: "POST", body: {
      holder_public_key: b64(publicKey), purposes: [PURPOSE], validity_s: CREDENTIAL_VALIDITY_S } });
    await save({ credential: { base64: issued.credential_base64, not_after: issued.credential.not_after,
                               credential_id: issued.credential.credential_id } });
  }

  async function ensureTokenBatch() {
    const batch = state.batch;
    if (batch && secondsLeft(batch.not_after) > RENEW_BEFORE_S) return;
    if (!sessionToken()) return;
    const issued = await memberApi("/token-batches", { method: "POST", body: { purposes: [PURPOSE] } });
    await save({ batch: { slot_length_s: issued.slot_length_s, not_after: issued.credential.not_after,
                          tokens: issued.tokens.map((t) => ({ start_s: Date.parse(t.slot_start) / 1000,
                                                               code: t.code })) } });
  }

  async function nextHolderCode() {
    const credential = state.credential;
    if (!credential || secondsLeft(credential.not_after) <= 0) return null;
    // The counter goes up with every code shown, and is saved before the code is.
    const counter = (state.counter || 0) + 1;
    await save({ counter });
    const code = await OnecardHolderCode.makeHolderCode({
      credential: unb64(credential.base64), timeS: nowS(), counter, purpose: PURPOSE, subtle: crypto.subtle,
      sign: (message) => crypto.subtle.sign({ name: "Ed25519" }, state.holderKey.privateKey, message),
    });
    return { code, untilS: nowS() + HOLDER_CODE_REFRESH_S, length: HOLDER_CODE_REFRESH_S };
  }

  function currentToken() {
    const batch = state.batch;
    if (!batch) return null;
    const now = nowS();
    const token = batch.tokens.find((t) => t.start_s <= now && now < t.start_s + batch.slot_length_s);
    return token ? { code: token.code, untilS: token.start_s + batch.slot_length_s, length: batch.slot_length_s }
      : null;
  }

  function drawQr(text) {
    const qr = qrcode(0, "M");
    qr.addData(text, "Alphanumeric");
    qr.make();
    const count = qr.getModuleCount();
    const quiet = 4;
    let path = "";
    for (let r = 0; r < count; r++) {
      for (let c = 0; c < count; c++) if (qr.isDark(r, c)) path += "M" + (c + quiet) + " " + (r + quiet) + "h1v1h-1z";
    }
    const size = count + 2 * quiet;
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 " + size + " " + size);
    svg.setAttribute("shape-rendering", "crispEdges");
    svg.setAttribute("aria-hidden", "true");
    svg.setAttribute("focusable", "false");
    const background = document.createElementNS(ns, "rect");
    background.setAttribute("width", size);
    background.setAttribute("height", size);
    background.setAttribute("fill", "#fff");
    const modules = document.createElementNS(ns, "path");
    modules.setAttribute("d", path);
    modules.setAttribute("fill", "#000");
    svg.append(background, modules);
    return svg;
  }

  function showCode(shown) {
    const box = $("code");
    if (!shown) {
      box.replaceChildren();
      box.dataset.code = "";
      box.setAttribute("aria-label", "No code available: open the code page from your app while online");
      $("countdown").textContent = "";
      shownUntilS = 0;
      return;
    }
    box.replaceChildren(drawQr(shown.code));
    // The text a screen reader or a test can read; the same characters the QR holds.
    box.dataset.code = shown.code;
    box.setAttribute("aria-label", "Pay code, shown as a QR for the till to scan");
    shownUntilS = shown.untilS;
    $("countdown-bar").max = shown.length;
  }

  async function tick() {
    const left = shownUntilS - nowS();
    if (left <= 0 && !nextCodeBusy) {
      nextCodeBusy = true;
      try {
        showCode(document.body.dataset.mode === "holder" ? await nextHolderCode() : currentToken());
      } finally {
        nextCodeBusy = false;
      }
    }
    const remaining = Math.max(0, shownUntilS - nowS());
    if (shownUntilS) {
      $("countdown").textContent = "New code in " + remaining + " s";
      $("countdown-bar").value = remaining;
    }
  }

  // --- the member's money --------------------------------------------------------------------

  const PURSE_NAMES = { cash: "Cash", subsidy: "Subsidy", voucher: "Voucher" };
  const KIND_NAMES = { payment: "Payment", top_up: "Top-up", refund: "Refund", subsidy_grant: "Subsidy",
                       offline_settlement: "Offline payment", capture: "Payment", top_up_reversal: "Top-up reversed",
                       subsidy_expiry: "Subsidy expired", expiry: "Expired", clawback: "Clawback" };

  // Integer fen to yuan text, with no floating point on the way.
  function yuan(fen) {
    const sign = fen < 0 ? "−" : "";
    const abs = Math.abs(fen);
    return sign + "¥" + Math.floor(abs / 100) + "." + String(abs % 100).padStart(2, "0");
  }

  async function refreshWallet() {
    const balances = await memberApi("/balances");
    const purses = balances.purses.filter((p) => p.owner_kind === "member");
    const transfers = [];
    for (const purse of purses) {
      const page = await memberApi("/v1/tenants/" + encodeURIComponent(state.member.tenant_id) + "/accounts/" +
                                   encodeURIComponent(purse.account_id) + "/transfers?page_size=" + HISTORY_ITEMS);
      for (const t of page.transfers) {
        const mine = t.postings.filter((p) => p.account_id === purse.account_id)
          .reduce((sum, p) => sum + p.amount_fen, 0);
        transfers.push({ transfer_id: t.transfer_id, kind: t.kind, booked_at: t.booked_at, amount_fen: mine,
                         purse: purse.purse_kind });
      }
    }
    transfers.sort((a, b) => (a.booked_at < b.booked_at ? 1 : -1));
    await save({ wallet: { purses: purses.map((p) => ({ purse_kind: p.purse_kind, ref: p.ref,
                                                        available_fen: p.available_fen })),
                           transfers: transfers.slice(0, HISTORY_ITEMS), as_of: new Date().toISOString() } });
  }

  function showWallet(live) {
    const wallet = state.wallet;
    const list = $("balances");
    const history = $("history");
    list.replaceChildren();
    history.replaceChildren();
    if (!wallet) {
      $("balance-note").textContent = "Balances show when the phone is online.";
      return;
    }
    $("balance-note").textContent = live ? "" :
      "Last known, as of " + new Date(wallet.as_of).toLocaleString() + ".";
    for (const purse of wallet.purses) {
      const item = document.createElement("li");
      const name = document.createElement("span");
      name.textContent = (PURSE_NAMES[purse.purse_kind] || purse.purse_kind) + (purse.ref ? " · " + purse.ref : "");
      const amount = document.createElement("span");
      amount.className = "amount";
      amount.textContent = yuan(purse.available_fen);
      item.append(name, amount);
      list.append(item);
    }
    if (!wallet.transfers.length) {
      const item = document.createElement("li");
      item.textContent = "No payments yet.";
      history.append(item);
    }
    for (const t of wallet.transfers) {
      const item = document.createElement("li");
      const what = document.createElement("span");
      what.textContent = KIND_NAMES[t.kind] || t.kind;
      const when = document.createElement("time");
      when.dateTime = t.booked_at;
      when.textContent = new Date(t.booked_at).toLocaleString();
      what.append(when);
      const amount = document.createElement("span");
      amount.className = "amount";
      amount.textContent = yuan(t.amount_fen);
      item.append(what, amount);
      history.append(item);
    }
  }

  // --- report lost ---------------------------------------------------------------------------

  async function reportLost() {
    const dialog = $("confirm-lost");
    const answer = await new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue), { once: true });
      dialog.showModal();
    });
    if (answer !== "confirm") return;
    try {
      const member = await memberApi("");
      const active = member.cards.filter((c) => c.status === "active");
      if (!active.length) {
        say("You have no active card to report.", true);
        return;
      }
      for (const card of active) {
        await memberApi("/cards/" + encodeURIComponent(card.card_uid) + "/report-lost", { method: "POST" });
      }
      say("Your card is reported lost and blocked. Ask the card office for a new one.", true);
    } catch (error) {
      say(error.message);
    }
  }

  // --- the page ------------------------------------------------------------------------------

  function say(text, ok = false) {
    const box = $("message");
    box.textContent = text;
    box.hidden = !text;
    box.classList.toggle("ok", ok);
  }

  function showNetwork() {
    const online = navigator.onLine;
    document.body.classList.toggle("offline", !online);
    $("network").textContent = online ? "Online" : "Offline: codes still work";
    $("report-lost").disabled = !online || !sessionToken();
  }

  function showMode() {
    const mode = document.body.dataset.mode;
    $("mode").textContent = mode === "holder"
      ? "Signed on this phone with a key that cannot be copied out of it (Ed25519). Works offline."
      : mode === "tokens"
        ? "This browser cannot keep a signing key (no Ed25519 in WebCrypto), so it shows codes the server "
          + "signed in advance, one a minute for 24 hours. Works offline."
        : "";
  }

  async function online() {
    if (!navigator.onLine || !sessionToken()) return;
    try {
      await (document.body.dataset.mode === "holder" ? ensureHolderCredential() : ensureTokenBatch());
      await refreshWallet();
      showWallet(true);
    } catch (error) {
      showWallet(false);
      if (error instanceof Problem || !navigator.onLine) say(error.message);
    }
    showNetwork();
  }

  async function main() {
    if ("serviceWorker" in navigator) {
      navigator.serviceWorker.register("sw.js").catch(() => { /* the page still works, only not offline */ });
    }
    state = await load();
    const secret = location.hash.slice(1);
    if (secret) {
      try {
        await redeemLink(secret);
      } catch (error) {
        say(error instanceof Problem && error.reason === "LINK_USED"
          ? "This link was used already. Open the code page from your app again."
          : error.message);
      }
    }
    if (!state.member) {
      showNetwork();
      showCode(null);
      if (!secret) say("Open this page from your campus card app.");
      return;
    }
    document.body.dataset.mode = state.holderKey || (await ed25519Available()) ? "holder" : "tokens";
    showMode();
    showWallet(false);
    showNetwork();
    await online();
    await tick();
    setInterval(tick, 1000);
    window.addEventListener("online", () => { showNetwork(); online(); });
    window.addEventListener("offline", showNetwork);
    $("report-lost").addEventListener("click", reportLost);
  }

  main().catch((error) => say("The page could not start: " + error.message));
})();
