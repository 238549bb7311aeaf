/* Keyturn portal: what keeps an open page live without asking the server every second.

   - Countdowns: every element with data-expires (epoch seconds) shows the time left,
     and every element with data-since the age, recomputed here once a second against
     the server's clock (meta keyturn-now), in the same words as the server renders
     them ("4m 10s", "due").
   - Polling fallback: pages listen to Server-Sent Events (htmx's sse extension,
     sse-connect). While a page's stream is not open (refused, a proxy that buffers,
     the portal restarting), the elements that would refresh on it are asked to
     refresh every few seconds instead (the "live-poll" trigger); once the stream is
     open again, polling stops.

   No inline script anywhere (the portal's CSP forbids it); no eval. */
(function () {
  "use strict";

  var POLL_MS = 2000;
  var GRACE_MS = 3000;
  var meta = document.querySelector('meta[name="keyturn-now"]');
  var skew = meta ? parseFloat(meta.content) * 1000 - Date.now() : 0;
  var loaded = Date.now();

  function now() { return (Date.now() + skew) / 1000; }

  function pad(n) { return (n < 10 ? "0" : "") + n; }

  // The same spans as portal/filters.py span().
  function span(seconds) {
    var s = Math.floor(Math.max(seconds, 0));
    if (s >= 86400) return Math.floor(s / 86400) + "d " + Math.floor(s % 86400 / 3600) + "h";
    if (s >= 3600) return Math.floor(s / 3600) + "h " + pad(Math.floor(s % 3600 / 60)) + "m";
    if (s >= 60) return Math.floor(s / 60) + "m " + pad(s % 60) + "s";
    return s + "s";
  }

  function tick() {
    var t = now();
    document.querySelectorAll("[data-expires]").forEach(function (el) {
      var left = parseFloat(el.getAttribute("data-expires")) - t;
      var text = left > 0 ? span(left) : "due";
      if (el.textContent !== text) el.textContent = text;
      el.classList.toggle("soon", left > 0 && left < 60);
    });
    document.querySelectorAll("[data-since]").forEach(function (el) {
      var text = span(t - parseFloat(el.getAttribute("data-since")));
      if (el.textContent !== text) el.textContent = text;
    });
  }

  function state(el, value) { el.setAttribute("data-live-state", value); }

  document.addEventListener("htmx:sseOpen", function (e) { state(e.target, "open"); });
  document.addEventListener("htmx:sseClose", function (e) { state(e.target, "closed"); });
  document.addEventListener("htmx:sseError", function (e) {
    var src = e.detail && e.detail.source;
    if (!src || src.readyState !== 1) state(e.target, "down");
  });

  function poll() {
    document.querySelectorAll("[sse-connect]").forEach(function (src) {
      var s = src.getAttribute("data-live-state");
      if (s === "open" || s === "closed") return;
      if (src.querySelector("[data-live-done]")) return;  // final: nothing more will change
      if (!s && Date.now() - loaded < GRACE_MS) return;  // still connecting
      src.querySelectorAll("[data-live-poll]").forEach(function (el) {
        if (window.htmx) window.htmx.trigger(el, "live-poll");
      });
    });
  }

  tick();
  window.setInterval(tick, 1000);
  window.setInterval(poll, POLL_MS);
})();
