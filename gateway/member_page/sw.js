// The code page's service worker: keeps the page's own files so that a reload with no network
// still shows codes. Only the page's files are cached, never an API answer: the credential, the
// token batch and the last known balances live in IndexedDB, written by app.js.
"use strict";
const CACHE = "onecard-member-page-v1";
const SHELL = ["./", "index.html", "style.css", "qrcode.js", "holdercode.js", "app.js", "manifest.webmanifest",
               "icon.svg", "icon-192.png", "icon-512.png"];

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(CACHE).then((cache) => cache.addAll(SHELL)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil((async () => {
    for (const name of await caches.keys()) if (name !== CACHE) await caches.delete(name);
    await self.clients.claim();
  })());
});

// Network first, so a new version arrives whenever the phone is online; the cache when it is not.
self.addEventListener("fetch", (event) => {
  const request = event.request;
  const url = new URL(request.url);
  const scope = new URL(self.registration.scope);
  if (request.method !== "GET" || url.origin !== scope.origin || !url.pathname.startsWith(scope.pathname)) return;
  event.respondWith((async () => {
    try {
      const answer = await fetch(request);
      if (answer.ok) {
        const cache = await caches.open(CACHE);
        await cache.put(request.mode === "navigate" ? "./" : request, answer.clone());
      }
      return answer;
    } catch (offline) {
      const cached = await caches.match(request.mode === "navigate" ? "./" : request, { ignoreSearch: true });
      if (cached) return cached;
      throw offline;
    }
  })());
});
