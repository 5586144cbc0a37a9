// The operators' dashboard: a realtime client of its own server. It gets an admin session
// token from POST /dashboard/session (the page's Basic credentials), subscribes to
// admin:stats over /v1/ws and draws every node's one-second snapshots (realtime/stats.py).
import { Client } from "/dashboard/piggybong-client.js";

const KEEP_MS = 300_000; // the charts' span: the last 5 minutes
const SILENT_MS = 30_000; // a node without a snapshot for longer is critical (health every 30 s)
const LEVELS = ["normal", "warning", "critical"];
const nodes = new Map(); // node -> snapshots, oldest first
let session = null;
const $ = (id) => document.getElementById(id);

async function mintToken() {
  const query = session ? `?user=${encodeURIComponent(session.user)}` : "";
  const response = await fetch(`/dashboard/session${query}`, { method: "POST", credentials: "same-origin" });
  if (!response.ok) throw new Error(`dashboard session: HTTP ${response.status}`);
  session = await response.json();
  return session.token;
}

function ingest(snapshot) {
  let list = nodes.get(snapshot.node);
  if (!list) nodes.set(snapshot.node, (list = []));
  if (list.length && list[list.length - 1].ts >= snapshot.ts) return; // a repeat (resubscribe)
  list.push(snapshot);
  while (list.length && list[0].ts < snapshot.ts - KEEP_MS) list.shift();
}

const sum = (values) => values.reduce((a, b) => a + (b ?? 0), 0);
const maxOf = (values) => values.reduce((a, b) => (b === null || b === undefined ? a : a === null ? b : Math.max(a, b)), null);
const worst = (levels) => levels.reduce((a, b) => (LEVELS.indexOf(b) > LEVELS.indexOf(a) ? b : a), "normal");
const fmt = (v, digits = 0) => (v === null || v === undefined ? "—" : Number(v).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits }));
const ms = (seconds) => (seconds === null || seconds === undefined ? "—" : `${fmt(seconds * 1000, seconds < 0.01 ? 2 : 1)} ms`);

/** The cluster now: the latest snapshot of every node heard from within SILENT_MS. */
function cluster(now) {
  const latest = [...nodes.entries()].map(([node, list]) => ({ node, snap: list[list.length - 1] }));
  const live = latest.filter((n) => now - n.snap.ts <= SILENT_MS).map((n) => n.snap);
  const silent = latest.filter((n) => now - n.snap.ts > SILENT_MS);
  const total = (key) => sum(live.map((s) => s.totals[key]));
  const rate = (key) => sum(live.map((s) => s.rates[key]));
  const tiers = {};
  for (const s of live) for (const [tier, n] of Object.entries(s.connections)) tiers[tier] = (tiers[tier] ?? 0) + n;
  const breakers = {};
  for (const s of live) for (const [name, state] of Object.entries(s.breakers)) {
    if (breakers[name] === undefined || state !== "closed") breakers[name] = state;
  }
  const reasons = [];
  for (const s of live) for (const reason of s.reasons) reasons.push({ level: s.level, text: live.length > 1 ? `${s.node}: ${reason}` : reason });
  for (const n of silent) reasons.push({ level: "critical", text: `${n.node}: no snapshot for ${Math.round((now - n.snap.ts) / 1000)} s` });
  reasons.sort((a, b) => LEVELS.indexOf(b.level) - LEVELS.indexOf(a.level));
  const redis = live.map((s) => s.redis);
  return {
    nodes: live.length,
    silent: silent.length,
    level: worst([...live.map((s) => s.level), ...(silent.length ? ["critical"] : [])]),
    reasons,
    connections: sum(Object.values(tiers)),
    tiers,
    connects: rate("connects"),
    disconnects: rate("disconnects"),
    published: rate("published"),
    delivered: rate("delivered"),
    publishedTotal: total("published"),
    deliveredTotal: total("delivered"),
    p50: maxOf(live.map((s) => s.latency.p50)),
    p95: maxOf(live.map((s) => s.latency.p95)),
    p99: maxOf(live.map((s) => s.latency.p99)),
    slowCuts: total("slow_cuts"),
    rateLimited: total("rate_limited"),
    doorRefused: total("door_refused"),
    redis: redis.includes("down") ? "down" : redis.includes("up") ? "up" : redis.length ? "off" : "—",
    reconnects: total("broker_reconnects"),
    breakers,
    queue: sum(live.map((s) => sum(Object.values(s.queue)))),
    retried: total("retried"),
    deadLetters: total("dead_letters"),
    expired: total("expired"),
    channels: sum(live.map((s) => s.channels)),
    watched: sum(live.map((s) => s.presence_watched ?? 0)),
    gapFills: total("gap_fills"),
    historyLost: total("history_lost"),
  };
}

/** Cluster series by second over KEEP_MS: f(snapshots of that second) per series, up to the
 * last second every live node has reported (a later one would be a partial sum). */
function series(now, pick) {
  const seconds = new Map();
  const lasts = [...nodes.values()].map((list) => list[list.length - 1].ts).filter((ts) => now - ts <= SILENT_MS);
  const complete = Math.floor(Math.min(...lasts, now) / 1000);
  for (const list of nodes.values()) for (const s of list) {
    if (s.ts < now - KEEP_MS || Math.floor(s.ts / 1000) > complete) continue;
    const second = Math.floor(s.ts / 1000);
    if (!seconds.has(second)) seconds.set(second, []);
    seconds.get(second).push(s);
  }
  const keys = [...seconds.keys()].sort((a, b) => a - b);
  return keys.map((second) => ({ t: second * 1000, v: pick(seconds.get(second)) }));
}

const COLORS = ["#58a6ff", "#3fb950", "#d29922", "#f778ba"];

function draw(canvas, now, lines) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (canvas.width !== width * ratio || canvas.height !== height * ratio) {
    canvas.width = width * ratio;
    canvas.height = height * ratio;
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const left = 56, right = 8, top = 8, bottom = 20;
  const values = lines.flatMap((l) => l.points.map((p) => p.v)).filter((v) => v !== null && Number.isFinite(v));
  const step = niceStep(Math.max(...values, 0) / 4 || 0.25);
  const top_ = step * 4;
  const x = (t) => left + ((t - (now - KEEP_MS)) / KEEP_MS) * (width - left - right);
  const y = (v) => top + (1 - v / top_) * (height - top - bottom);
  ctx.strokeStyle = "#2b3640"; ctx.fillStyle = "#8b98a5"; ctx.font = "11px system-ui, sans-serif"; ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = (top_ * i) / 4;
    ctx.beginPath(); ctx.moveTo(left, y(v)); ctx.lineTo(width - right, y(v)); ctx.stroke();
    ctx.textAlign = "right"; ctx.fillText(axisLabel(v, top_), left - 6, y(v) + 4);
  }
  for (let m = 5; m >= 0; m--) {
    ctx.textAlign = m === 5 ? "left" : m === 0 ? "right" : "center";
    ctx.fillText(m ? `-${m} min` : "now", x(now - m * 60_000), height - 4);
  }
  lines.forEach((line, i) => {
    ctx.strokeStyle = COLORS[i % COLORS.length]; ctx.lineWidth = 1.6; ctx.beginPath();
    let started = false;
    for (const p of line.points) {
      if (p.v === null || !Number.isFinite(p.v)) { started = false; continue; }
      if (started) ctx.lineTo(x(p.t), y(p.v)); else { ctx.moveTo(x(p.t), y(p.v)); started = true; }
    }
    ctx.stroke();
    ctx.fillStyle = COLORS[i % COLORS.length]; ctx.textAlign = "left";
    ctx.fillText(line.label, left + 8 + i * 110, top + 12);
  });
}

/** The smallest of 1, 2, 2.5, 5 times a power of ten that is at least `v`. */
function niceStep(v) {
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}
const axisLabel = (v, top) => (top >= 1000 ? `${fmt(v / 1000, top >= 10000 ? 0 : 1)}k` : fmt(v, top < 2 ? 2 : top < 20 && v % 1 ? 1 : 0));

const text = (id, value) => { $(id).textContent = value; };
const cap = (level) => level.charAt(0).toUpperCase() + level.slice(1);

function render() {
  const now = Date.now();
  if (!nodes.size) return;
  const c = cluster(now);
  window.__dashboard = { cluster: c, nodes };
  const level = $("level");
  level.className = `level level-${c.level}`;
  level.dataset.level = c.level;
  text("level-name", cap(c.level));
  const reasons = $("reasons");
  reasons.replaceChildren(...c.reasons.map((r) => { const li = document.createElement("li"); li.textContent = `${cap(r.level)}: ${r.text}`; li.className = `st-${r.level}`; return li; }));
  text("nodes-count", `${c.nodes} node${c.nodes === 1 ? "" : "s"}${c.silent ? ` (+${c.silent} silent)` : ""}`);
  text("updated", `updated ${new Date(now).toLocaleTimeString()}`);
  text("c-connections", fmt(c.connections));
  text("c-tiers", Object.entries(c.tiers).map(([t, n]) => `${t} ${fmt(n)}`).join(" · ") || "—");
  text("c-connects", fmt(c.connects, 1)); text("c-disconnects", fmt(c.disconnects, 1));
  text("c-published", fmt(c.published, 1)); text("c-published-total", fmt(c.publishedTotal));
  text("c-delivered", fmt(c.delivered, 1)); text("c-delivered-total", fmt(c.deliveredTotal));
  text("c-p95", ms(c.p95)); text("c-p50", ms(c.p50)); text("c-p99", ms(c.p99));
  text("c-refusals", fmt(c.slowCuts + c.rateLimited + c.doorRefused));
  text("c-slow", fmt(c.slowCuts)); text("c-ratelimited", fmt(c.rateLimited)); text("c-door", fmt(c.doorRefused));
  text("c-redis", c.redis); text("c-reconnects", fmt(c.reconnects));
  text("c-redis-note", c.redis === "off" ? " · off: the in-process broker, one node" : "");
  const open = Object.values(c.breakers).filter((s) => s !== "closed").length;
  text("c-breakers", open ? `${open} not closed` : "all closed");
  text("c-breaker-list", Object.entries(c.breakers).map(([n, s]) => `${n} ${s.replace("_", "-")}`).join(" · ") || "—");
  text("c-queue", fmt(c.queue)); text("c-retried", fmt(c.retried)); text("c-dead", fmt(c.deadLetters)); text("c-expired", fmt(c.expired));
  text("c-channels", fmt(c.channels)); text("c-watched", fmt(c.watched)); text("c-gapfills", fmt(c.gapFills)); text("c-lost", fmt(c.historyLost));
  renderNodes(now);
  draw($("chart-connections"), now, [
    { label: "connections", points: series(now, (ss) => sum(ss.map((s) => sum(Object.values(s.connections))))) },
  ]);
  draw($("chart-rates"), now, [
    { label: "publishes/s", points: series(now, (ss) => sum(ss.map((s) => s.rates.published))) },
    { label: "deliveries/s", points: series(now, (ss) => sum(ss.map((s) => s.rates.delivered))) },
  ]);
  const latency = (q) => series(now, (ss) => { const v = maxOf(ss.map((s) => s.latency[q])); return v === null ? null : v * 1000; });
  draw($("chart-latency"), now, [
    { label: "p50", points: latency("p50") }, { label: "p95", points: latency("p95") }, { label: "p99", points: latency("p99") },
  ]);
  draw($("chart-refusals"), now, [
    { label: "slow cuts/s", points: series(now, (ss) => sum(ss.map((s) => s.rates.slow_cuts))) },
    { label: "rate limited/s", points: series(now, (ss) => sum(ss.map((s) => s.rates.rate_limited))) },
    { label: "door/s", points: series(now, (ss) => sum(ss.map((s) => s.rates.door_refused))) },
  ]);
}

function renderNodes(now) {
  const rows = [...nodes.entries()].sort(([a], [b]) => a.localeCompare(b)).map(([node, list]) => {
    const s = list[list.length - 1];
    const silent = now - s.ts > SILENT_MS;
    const level = silent ? "critical" : s.level;
    const cells = [
      node, cap(level), s.ready ? "yes" : "no", s.redis, fmt(sum(Object.values(s.connections))), fmt(s.rates.connects, 1),
      fmt(s.rates.published, 1), fmt(s.rates.delivered, 1), ms(s.latency.p95), fmt(s.totals.slow_cuts), fmt(s.totals.rate_limited),
      fmt(s.totals.door_refused), Object.entries(s.breakers).map(([n, st]) => `${n} ${st}`).join(", ") || "—",
      fmt(sum(Object.values(s.queue))), fmt(s.totals.dead_letters), `${Math.max(0, Math.round((now - s.ts) / 1000))} s ago`,
    ];
    const tr = document.createElement("tr");
    tr.dataset.node = node;
    for (const [i, value] of cells.entries()) {
      const td = document.createElement("td");
      td.textContent = value;
      if (i === 1) td.className = `st-${level}`;
      tr.append(td);
    }
    return tr;
  });
  $("nodes").tBodies[0].replaceChildren(...rows);
}

function feedState(state) {
  const el = $("feed");
  el.className = `feed feed-${state}`;
  el.textContent = state === "connected" ? "live" : state;
}

const scheme = location.protocol === "https:" ? "wss:" : "ws:";
const client = new Client(`${scheme}//${location.host}/v1/ws`, {
  token: mintToken,
  onState: feedState,
  onEvent: (message) => {
    if (message.channel === "admin:stats" && message.event === "node.stats") ingest(message.data);
  },
});
client.subscribe("admin:stats");
client.start();
setInterval(render, 1000);
window.addEventListener("resize", render);
