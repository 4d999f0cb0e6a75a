// One conversation's page: while it is still moving, say so when it changes (the page itself stays put).
"use strict";

(function () {
  const path = JSON.parse(document.getElementById("conversation-socket").textContent);
  const stateBadge = document.getElementById("conversation-state");
  const banner = document.getElementById("live-banner");
  if (stateBadge.classList.contains("state-wrapped_up")) return;  // nothing more will happen
  const labels = { active: "active", ended: "ended", wrapped_up: "wrapped up" };
  let attempts = 0;

  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    const socket = new WebSocket(scheme + window.location.host + path);
    socket.onopen = () => { attempts = 0; };
    socket.onmessage = (message) => {
      const data = JSON.parse(message.data);
      if (data.type !== "conversations") return;
      for (const snapshot of data.conversations) {
        stateBadge.textContent = labels[snapshot.state] || snapshot.state;
        stateBadge.className = "badge state-" + snapshot.state;
        banner.hidden = false;
      }
    };
    socket.onclose = () => {
      attempts += 1;
      window.setTimeout(connect, Math.min(15000, 1000 * 2 ** Math.min(attempts, 4)));
    };
  }

  connect();
})();
