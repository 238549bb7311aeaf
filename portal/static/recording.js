// The recording page: asciinema-player on the verified .cast file, a speed control and
// jumps to the lines typed (the recording's markers).
(function () {
  "use strict";
  var el = document.getElementById("player");
  if (!el || !window.AsciinemaPlayer) { return; }
  var speed = document.getElementById("player-speed");
  var player = null;

  function create(startAt, play) {
    if (player) { player.dispose(); }
    player = AsciinemaPlayer.create(el.dataset.src, el, {
      fit: "width", speed: parseFloat(speed ? speed.value : "1"), idleTimeLimit: 2,
      startAt: startAt || 0, autoPlay: !!play, preload: true, terminalFontSize: "14px"
    });
    window.keyturnPlayer = player;
  }

  create(0, false);
  if (speed) {
    speed.addEventListener("change", function () {
      var at = player.getCurrentTime ? player.getCurrentTime() : 0;
      create(at, true);
    });
  }
  document.querySelectorAll("button.jump").forEach(function (b) {
    b.addEventListener("click", function () {
      player.seek({ marker: parseInt(b.dataset.marker, 10) }).then(function () {
        player.play();
      });
    });
  });
}());
