// The recording page: asciinema-player on the verified .cast file, a speed control and
// jumps to the lines typed (the recording's markers). A long recording plays in parts
// cut at its keyframes (the server sends "<cast>?from=K": keyframe K's screen, then the
// events up to a later keyframe); times and marker numbers are then relative to the part.
(function () {
  "use strict";
  var el = document.getElementById("player");
  if (!el || !window.AsciinemaPlayer) { return; }
  var speed = document.getElementById("player-speed");
  var part = document.getElementById("player-part");
  var startForm = document.getElementById("player-start");
  var keyframes = el.dataset.windowed ? JSON.parse(el.dataset.keyframes || "[]") : [];
  var player = null;
  var from = 0; // the keyframe the loaded part starts at

  function src(k) {
    return el.dataset.windowed ? el.dataset.src + "?from=" + k : el.dataset.src;
  }

  function create(k, startAt, play) {
    if (player) { player.dispose(); }
    from = k;
    player = AsciinemaPlayer.create(src(k), el, {
      fit: "width", speed: parseFloat(speed ? speed.value : "1"), idleTimeLimit: 2,
      startAt: startAt || 0, autoPlay: !!play, preload: true, terminalFontSize: "14px"
    });
    window.keyturnPlayer = player;
    if (part) {
      // the part whose start is the latest one at or before keyframe k
      var best = part.options[0];
      Array.prototype.forEach.call(part.options, function (o) {
        if (parseInt(o.value, 10) <= k) { best = o; }
      });
      part.value = best.value;
    }
  }

  // the latest keyframe at or before the test's condition
  function latest(ok) {
    var k = 0;
    keyframes.forEach(function (f, i) { if (ok(f)) { k = i; } });
    return k;
  }

  function seconds(text) {
    var total = 0;
    var ok = /^\s*\d+(:\d{1,2}){0,2}\s*$/.test(text);
    if (!ok) { return null; }
    text.trim().split(":").forEach(function (p) { total = total * 60 + parseInt(p, 10); });
    return total;
  }

  create(0, 0, false);
  if (speed) {
    speed.addEventListener("change", function () {
      var at = player.getCurrentTime ? player.getCurrentTime() : 0;
      create(from, at, true);
    });
  }
  if (part) {
    part.addEventListener("change", function () {
      create(parseInt(part.value, 10), 0, false);
    });
  }
  if (startForm) {
    startForm.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var input = document.getElementById("player-from");
      var t = seconds(input.value);
      if (t === null) {
        input.setCustomValidity("a time like 1:05:30 or 90");
        input.reportValidity();
        return;
      }
      input.setCustomValidity("");
      var k = latest(function (f) { return f.t <= t; });
      create(k, Math.max(0, t - keyframes[k].t), true);
    });
  }
  document.querySelectorAll("button.jump").forEach(function (b) {
    b.addEventListener("click", function () {
      var m = parseInt(b.dataset.marker, 10);
      if (!keyframes.length) {
        player.seek({ marker: m }).then(function () { player.play(); });
        return;
      }
      var k = latest(function (f) { return f.markers <= m; });
      create(k, 0, false);
      player.seek({ marker: m - keyframes[k].markers }).then(function () {
        player.play();
      });
    });
  });
}());
