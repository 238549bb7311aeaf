/* The session page's replay: steps through the transcript already on the page, with the
   gaps between statements as they happened (scaled by the speed, each gap kept between
   0.15 s and 3 s). No request to the server; without JavaScript every step stays shown. */
(function () {
  "use strict";
  var MIN_GAP = 150, MAX_GAP = 3000;

  function setup(root) {
    var list = root.querySelector("[data-replay]");
    var controls = root.querySelector("[data-replay-controls]");
    if (!list || !controls) { return; }
    var steps = Array.prototype.slice.call(list.children);
    var times = steps.map(function (li) { return parseFloat(li.getAttribute("data-t")) || 0; });
    var play = controls.querySelector('[data-act="play"]');
    var speed = controls.querySelector('[data-act="speed"]');
    var pos = controls.querySelector("[data-replay-pos]");
    var shown = steps.length;  // steps 0..shown-1 are visible; all of them to start with
    var timer = null;

    function render(scroll) {
      steps.forEach(function (li, i) {
        li.hidden = i >= shown;
        var current = i === shown - 1 && shown < steps.length;
        li.classList.toggle("current", current || (timer !== null && i === shown - 1));
        if (current || (timer !== null && i === shown - 1)) {
          li.setAttribute("aria-current", "step");
        } else {
          li.removeAttribute("aria-current");
        }
      });
      pos.textContent = shown >= steps.length ? "all " + steps.length + " steps"
        : "step " + shown + " of " + steps.length;
      if (scroll && shown > 0) {
        steps[shown - 1].scrollIntoView({ block: "nearest" });
      }
    }

    function stop() {
      if (timer !== null) { clearTimeout(timer); timer = null; }
      play.textContent = "Play";
    }

    function tick() {
      if (shown >= steps.length) { stop(); render(false); return; }
      shown += 1;
      render(true);
      if (shown >= steps.length) { stop(); render(false); return; }
      var gap = (times[shown] - times[shown - 1]) * 1000 / (parseFloat(speed.value) || 1);
      timer = setTimeout(tick, Math.min(MAX_GAP, Math.max(MIN_GAP, gap)));
    }

    controls.addEventListener("click", function (ev) {
      var act = ev.target.closest("[data-act]");
      if (!act) { return; }
      switch (act.getAttribute("data-act")) {
        case "play":
          if (timer !== null) { stop(); render(false); return; }
          if (shown >= steps.length) { shown = 0; }
          play.textContent = "Pause";
          timer = setTimeout(tick, 0);
          break;
        case "prev":
          stop();
          shown = shown >= steps.length ? steps.length - 1 : Math.max(1, shown - 1);
          render(true);
          break;
        case "next":
          stop();
          shown = shown >= steps.length ? 1 : shown + 1;
          render(true);
          break;
        case "all":
          stop();
          shown = steps.length;
          render(false);
          break;
      }
    });
    controls.hidden = false;
    render(false);
  }

  function init() {
    Array.prototype.forEach.call(document.querySelectorAll("[data-replay-root]"), setup);
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
