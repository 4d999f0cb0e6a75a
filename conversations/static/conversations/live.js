// The live page: state over HTTP on every (re)connect, then snapshots over the WebSocket.
// A channel layer may drop messages to a slow client, so HTTP is the truth and the socket only keeps it fresh.
"use strict";

(function () {
  const config = JSON.parse(document.getElementById("live-config").textContent);
  const ENDED_WINDOW_MS = 30 * 60 * 1000;  // ended conversations stay while in after-call work (selectors.py)
  const RESYNC_MS = 60 * 1000;
  const HEALTH_MS = 5 * 1000;
  const RATE_WINDOW_S = 10;

  const live = {
    conversations: new Map(),  // conversation id -> snapshot
    rows: new Map(),           // conversation id -> <tr>
    today: null,               // {since, by_state, total} from the server, moved along by snapshots
    stats: [],                 // [receivedAtMs, events] over the last RATE_WINDOW_S seconds
    eventsLastMinute: 0,
    clockOffsetMs: 0,          // server time - browser time
    socket: null,
    openedAt: 0,
    attempts: 0,
    loadedAt: 0,
    stateLoads: 0,             // how many times the state was read over HTTP (tests read this)
    reconnects: 0,
  };
  window.liveMonitor = live;

  const $ = (id) => document.getElementById(id);
  const now = () => Date.now() + live.clockOffsetMs;
  const time = (iso) => (iso ? Date.parse(iso) : 0);

  // -- connection ---------------------------------------------------------------------------------------
  function connect() {
    setStatus("connecting", live.attempts ? "reconnecting…" : "connecting…");
    const scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    const socket = new WebSocket(scheme + window.location.host + config.socketPath);
    live.socket = socket;
    socket.onopen = () => {
      live.attempts = 0;
      live.openedAt = Date.now();
      live.stats = [];
      setStatus("live", "live");
      loadState();  // after subscribing, so nothing that changes meanwhile is missed
    };
    socket.onmessage = (message) => receive(JSON.parse(message.data));
    socket.onclose = () => {
      if (live.socket !== socket) return;
      live.socket = null;
      live.attempts += 1;
      live.reconnects += 1;
      const delay = Math.min(15000, 500 * 2 ** Math.min(live.attempts, 5)) * (0.5 + Math.random() / 2);
      setStatus("offline", "reconnecting in " + Math.ceil(delay / 1000) + " s");
      window.setTimeout(connect, delay);
    };
  }

  function setStatus(status, text) {
    const badge = $("connection-status");
    badge.dataset.status = status;
    badge.textContent = text;
    badge.className = "badge " + ({ live: "badge-ok", offline: "badge-bad" }[status] || "badge-wait");
  }

  async function getJson(url) {
    const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
    if (response.status === 401 || response.status === 403) {
      window.location.assign(config.loginUrl + "?next=" + encodeURIComponent(window.location.pathname + window.location.search));
      throw new Error("logged out");
    }
    if (!response.ok) throw new Error(url + ": HTTP " + response.status);
    return response.json();
  }

  async function loadState() {
    const requestedAt = now();
    let state;
    try {
      state = await getJson(config.stateUrl);
    } catch (error) {
      console.warn("live state not loaded", error);
      return;
    }
    live.stateLoads += 1;
    live.clockOffsetMs = Date.parse(state.server_time) - Date.now();
    const fresh = new Map(state.conversations.map((c) => [c.conversation_id, c]));
    for (const [id, current] of live.conversations) {
      // A snapshot that came over the socket after the server read its state is newer: keep it.
      const incoming = fresh.get(id);
      if (incoming ? time(current.updated_at) > time(incoming.updated_at) : time(current.updated_at) > requestedAt) {
        fresh.set(id, current);
      }
    }
    live.conversations = fresh;
    live.today = state.today;
    live.eventsLastMinute = state.events_last_minute;
    live.loadedAt = now();
    renderHealth(state.health);
    render();
  }

  function receive(message) {
    if (message.type === "conversations") message.conversations.forEach(apply);
    if (message.type === "stats") live.stats.push([Date.now(), message.events]);
    if (message.type === "conversations") render();
  }

  function apply(snapshot) {
    const id = snapshot.conversation_id;
    const current = live.conversations.get(id);
    if (current && time(current.updated_at) > time(snapshot.updated_at)) return;  // an older copy
    count(current, snapshot);
    const leftQueue = config.queueId && snapshot.queue_id !== config.queueId;
    if (snapshot.state === "wrapped_up" || leftQueue) {
      live.conversations.delete(id);
    } else {
      live.conversations.set(id, snapshot);
    }
  }

  // Today's counters move with the snapshots between two HTTP loads, which set them exactly again.
  function count(previous, snapshot) {
    const today = live.today;
    if (!today || time(snapshot.started_at) < time(today.since)) return;
    if (previous && previous.state !== snapshot.state) {
      today.by_state[previous.state] = Math.max(0, (today.by_state[previous.state] || 0) - 1);
      today.by_state[snapshot.state] = (today.by_state[snapshot.state] || 0) + 1;
    } else if (!previous && time(snapshot.started_at) >= live.loadedAt - 5000 && snapshot.state !== "wrapped_up") {
      today.by_state[snapshot.state] = (today.by_state[snapshot.state] || 0) + 1;
      today.total += 1;
    }
  }

  // -- rendering ----------------------------------------------------------------------------------------
  let renderQueued = false;
  function render() {
    if (renderQueued) return;
    renderQueued = true;
    window.requestAnimationFrame(() => {
      renderQueued = false;
      renderConversations();
      renderCounters();
    });
  }

  function visible() {
    const cutoff = now() - ENDED_WINDOW_MS;
    return [...live.conversations.values()]
      .filter((c) => c.state !== "ended" || time(c.ended_at) >= cutoff)
      .sort((a, b) => time(b.started_at) - time(a.started_at) || (a.conversation_id < b.conversation_id ? -1 : 1));
  }

  function renderConversations() {
    const tbody = $("live-conversations").tBodies[0];
    const shown = visible();
    const keep = new Set(shown.map((c) => c.conversation_id));
    for (const [id, row] of live.rows) {
      if (!keep.has(id)) {
        row.remove();
        live.rows.delete(id);
      }
    }
    for (const snapshot of shown) tbody.appendChild(rowFor(snapshot));
    $("no-conversations").hidden = shown.length > 0;
    $("conversation-count").textContent = shown.length ? "(" + shown.length + ")" : "";
  }

  function rowFor(snapshot) {
    const id = snapshot.conversation_id;
    let row = live.rows.get(id);
    if (!row) {
      row = document.createElement("tr");
      row.dataset.conversationId = id;
      for (let i = 0; i < 7; i++) row.appendChild(document.createElement("td"));
      const link = document.createElement("a");
      link.href = config.detailUrlTemplate.replace("CONVERSATION_ID", encodeURIComponent(id));
      link.textContent = id.slice(0, 8) + "…";
      link.title = id;
      row.cells[6].appendChild(link);
      row.cells[6].className = "mono";
      flash(row, "new");
      live.rows.set(id, row);
    }
    if (row.dataset.state && row.dataset.state !== snapshot.state) flash(row, "changed");
    row.dataset.state = snapshot.state;
    row.dataset.since = snapshot.state_since || "";
    const waiting = snapshot.state === "active" && !snapshot.agent_id;
    row.cells[0].replaceChildren(stateBadge(snapshot.state, waiting));
    row.cells[0].className = "state";
    row.cells[1].className = "num since";
    row.cells[1].textContent = duration(now() - time(snapshot.state_since));
    row.cells[2].textContent = snapshot.queue_name || snapshot.queue_id || "–";
    row.cells[3].textContent = snapshot.media_type || "–";
    row.cells[4].textContent = snapshot.direction || "–";
    row.cells[5].textContent = snapshot.agent_name || (waiting ? "waiting…" : "–");
    return row;
  }

  function stateBadge(state, waiting) {
    const badge = document.createElement("span");
    const label = waiting ? "waiting" : { active: "active", ended: "after-call work", wrapped_up: "wrapped up" }[state] || state;
    badge.className = "badge state-" + (waiting ? "waiting" : state);
    badge.textContent = label;
    return badge;
  }

  function flash(row, name) {
    row.classList.add(name);
    window.setTimeout(() => row.classList.remove(name), 1500);
  }

  function renderCounters() {
    const shown = visible();
    const active = shown.filter((c) => c.state === "active");
    $("count-active").textContent = active.length;
    $("count-waiting").textContent = active.filter((c) => !c.agent_id).length;
    $("count-ended").textContent = shown.filter((c) => c.state === "ended").length;
    if (live.today) {
      $("count-wrapped_up").textContent = live.today.by_state.wrapped_up || 0;
      $("count-today").textContent = live.today.total;
    }
    renderQueues(shown);
  }

  function renderQueues(shown) {
    const queues = new Map();
    for (const c of shown) {
      const key = c.queue_id || "";
      const q = queues.get(key) || { id: key, name: c.queue_name || c.queue_id || "(no queue)", active: 0, waiting: 0, ended: 0 };
      if (c.state === "active") q.active += 1;
      if (c.state === "active" && !c.agent_id) q.waiting += 1;
      if (c.state === "ended") q.ended += 1;
      queues.set(key, q);
    }
    const tbody = $("queue-counters").tBodies[0];
    const rows = [...queues.values()].sort((a, b) => b.active - a.active || a.name.localeCompare(b.name)).map((q) => {
      const row = document.createElement("tr");
      row.dataset.queueId = q.id;
      const name = document.createElement("td");
      if (q.id && !config.queueId) {
        const link = document.createElement("a");
        link.href = config.queueUrlTemplate.replace("QUEUE_ID", encodeURIComponent(q.id));
        link.textContent = q.name;
        name.appendChild(link);
      } else {
        name.textContent = q.name;
      }
      row.appendChild(name);
      for (const value of [q.active, q.waiting, q.ended]) {
        const cell = document.createElement("td");
        cell.className = "num";
        cell.textContent = value;
        row.appendChild(cell);
      }
      return row;
    });
    tbody.replaceChildren(...rows);
    $("no-queues").hidden = rows.length > 0;
  }

  function tick() {
    for (const row of live.rows.values()) {
      row.cells[1].textContent = duration(now() - time(row.dataset.since));
    }
    const cutoff = Date.now() - RATE_WINDOW_S * 1000;
    live.stats = live.stats.filter(([at]) => at >= cutoff);
    const listening = (Date.now() - live.openedAt) / 1000;
    let rate = live.eventsLastMinute / 60;
    if (live.socket && listening >= 3) {
      rate = live.stats.reduce((sum, [, n]) => sum + n, 0) / Math.min(RATE_WINDOW_S, listening);
    }
    $("events-per-second").textContent = rate.toFixed(1);
    if (live.conversations.size) render();  // ended conversations leave after their window
  }

  // -- stream health ------------------------------------------------------------------------------------
  async function loadHealth() {
    try {
      renderHealth(await getJson(config.healthUrl));
    } catch (error) {
      console.warn("stream health not loaded", error);
    }
  }

  function renderHealth(health) {
    const worker = health.workers[0];
    const connection = health.connections[0];
    const checkpoint = health.checkpoints[0];
    const summary = $("health-summary");
    const details = $("health-details");
    if (!worker && !connection && !checkpoint) {
      summary.textContent = "No worker has reported yet: is `manage.py stream_events` running?";
      summary.className = "muted";
      details.replaceChildren();
      return;
    }
    const stale = worker ? worker.stale : false;
    const connected = connection ? connection.connected : worker ? worker.connected : null;
    summary.textContent = [
      (connection || worker || checkpoint).source.toUpperCase(),
      connected === null ? "connection unknown" : connected ? "connected" : "disconnected",
      stale ? "worker silent" : "",
    ].filter(Boolean).join(" · ");
    summary.className = stale || connected === false ? "error" : "ok";
    const lastEvent = latest([connection && connection.last_event_at, worker && worker.last_event_at,
      checkpoint && checkpoint.committed_at]);
    const items = [
      ["Connected since", connection ? connection.connected_at : worker && worker.started_at, "time"],
      ["Last heartbeat", worker ? worker.beat_at : connection && connection.last_heartbeat_at, "ago"],
      ["Last event", lastEvent, "ago"],
      ["Reconnects", worker ? worker.reconnects : connection ? connection.reconnects + " (24 h)" : null, "text"],
      ["Events committed", checkpoint ? checkpoint.events_committed : worker && worker.events_committed, "text"],
      ["Worker", worker ? worker.worker : connection && connection.worker, "text"],
    ];
    if (connection && !connection.connected && connection.disconnect_reason) {
      items.push(["Disconnected because", connection.disconnect_reason, "text"]);
    }
    details.replaceChildren(...items.flatMap(([label, value, kind]) => {
      const dt = document.createElement("dt");
      dt.textContent = label;
      const dd = document.createElement("dd");
      dd.textContent = value === null || value === undefined || value === "" ? "–"
        : kind === "ago" ? ago(value) : kind === "time" ? clock(value) : String(value);
      if (kind !== "text" && value) dd.title = value;
      return [dt, dd];
    }));
  }

  function latest(values) {
    return values.filter(Boolean).sort((a, b) => time(b) - time(a))[0] || null;
  }

  // -- formatting ---------------------------------------------------------------------------------------
  function duration(ms) {
    const s = Math.max(0, Math.floor(ms / 1000));
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const pad = (n) => String(n).padStart(2, "0");
    return h ? h + ":" + pad(m) + ":" + pad(s % 60) : m + ":" + pad(s % 60);
  }

  function ago(iso) {
    return duration(now() - time(iso)) + " ago";
  }

  function clock(iso) {
    const moment = new Date(iso);
    const today = new Date().toDateString() === moment.toDateString();
    return today ? moment.toLocaleTimeString() : moment.toLocaleString();
  }

  connect();
  window.setInterval(tick, 1000);
  window.setInterval(loadState, RESYNC_MS);
  window.setInterval(loadHealth, HEALTH_MS);
})();
