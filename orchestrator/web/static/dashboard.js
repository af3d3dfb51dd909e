// The dlorch dashboard: one server-sent-events stream (/api/events) redraws the tables; cancel and drain
// post to the API (the same requests as `dlorch cancel` and `dlorch nodes drain`). Data is put in the page
// with textContent only: job names and errors are user input.
"use strict";

const state = { selected: null, source: null, detail: null, logsKey: null, filter: null, jobs: [], summary: null };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function ago(seconds) {
  if (seconds < 60) return `${seconds.toFixed(0)} s ago`;
  if (seconds < 3600) return `${(seconds / 60).toFixed(0)} min ago`;
  return `${(seconds / 3600).toFixed(1)} h ago`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

function shortId(id) { return id.length > 24 ? "…" + id.slice(-15) : id; }

function fill(tableId, rows, emptyId) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren(...rows);
  document.getElementById(emptyId).hidden = rows.length > 0;
  document.getElementById(tableId).hidden = rows.length === 0;
}

function say(text, isError) {
  const box = document.getElementById("message");
  box.textContent = text;
  box.className = "message" + (isError ? " error" : "");
  box.hidden = false;
  clearTimeout(say.timer);
  say.timer = setTimeout(() => { box.hidden = true; }, isError ? 12000 : 4000);
}

async function post(url, what) {
  try {
    const r = await fetch(url, { method: "POST", headers: { "accept": "application/json" } });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(typeof body.detail === "string" ? body.detail : `${what}: HTTP ${r.status}`);
    say(body.message || what, false);
  } catch (e) {
    say(`${what} failed: ${e.message}`, true);
  }
}

function cancelJob(id, button) {
  button.disabled = true;
  post(`/api/jobs/${encodeURIComponent(id)}/cancel`, `cancel ${id}`);
}

function drainNode(id, button) {
  button.disabled = true;
  post(`/api/nodes/${encodeURIComponent(id)}/drain`, `drain ${id}`);
}

function statusBadge(status) { return el("span", { class: `status ${status || "gone"}` }, status || "unknown"); }

function progressCell(job) {
  const p = job.progress;
  const label = job.kind === "predict" || !job.epochs_total
    ? (p === null ? "–" : `${Math.round(p * 100)}%`)
    : `${job.epochs_done}/${job.epochs_total} epochs`;
  const bar = el("span", { class: "bar" }, el("span", { class: "fill" }));
  bar.firstChild.style.width = `${Math.round((p || 0) * 100)}%`;
  return el("td", { class: "progress" }, bar, " ", label);
}

function heldOut(job) {
  const entries = Object.entries(job.held_out || {});
  if (!entries.length) return "–";
  const [k, v] = entries[0];
  return `${k.replace("val_", "")} ${v.toFixed(3)}`;
}

function renderJobs(jobs) {
  state.jobs = jobs;
  const shown = state.filter ? jobs.filter((j) => j.status === state.filter) : jobs;
  const rows = shown.map((j) => {
    const cancel = j.cancellable
      ? el("button", { type: "button", class: "cancel", "data-job": j.id,
                       onclick: (e) => { e.stopPropagation(); cancelJob(j.id, e.target); } }, "cancel")
      : null;
    const tr = el("tr", { "data-job": j.id, "data-status": j.status, class: j.id === state.selected ? "selected" : "",
                          onclick: () => select(j.id) },
      el("td", { title: j.id }, el("a", { href: `#${j.id}` }, j.name ? `${j.name} (${shortId(j.id)})` : j.id)),
      el("td", {}, j.kind), el("td", {}, statusBadge(j.status)), progressCell(j), el("td", {}, heldOut(j)),
      el("td", {}, j.attempts), el("td", {}, j.node || "–"), el("td", {}, j.priority), el("td", {}, cancel));
    if (j.error) tr.title = j.error;
    return tr;
  });
  fill("jobs", rows, "jobs-empty");
  const filtered = document.getElementById("jobs-filtered");
  filtered.hidden = !state.filter;
  filtered.textContent = state.filter ? `Showing ${state.filter} jobs only (${shown.length} of ${jobs.length}).` : "";
  if (jobs.length) document.getElementById("jobs-empty").hidden = true;
}

function renderQueue(entries) {
  const rows = entries.map((q) => el("tr", { "data-job": q.job, class: q.current ? "" : "stale" },
    el("td", {}, q.position), el("td", { title: q.job }, q.name ? `${q.name} (${shortId(q.job)})` : q.job),
    el("td", {}, q.kind), el("td", {}, q.priority), el("td", {}, q.token || "blocks"),
    el("td", {}, q.current ? statusBadge(q.status) : `dropped at claim (${q.status || "no job"})`)));
  fill("queue", rows, "queue-empty");
}

function renderNodes(nodes) {
  const rows = nodes.map((n) => {
    const drain = n.alive && !n.drain
      ? el("button", { type: "button", class: "drain", "data-node": n.id, onclick: (e) => drainNode(n.id, e.target) },
           "drain")
      : null;
    return el("tr", { "data-node": n.id },
      el("td", { title: n.hostname }, n.id), el("td", {}, n.kind), el("td", {}, n.hardware),
      el("td", {}, n.precision || "–"), el("td", {}, statusBadge(n.drain && n.state !== "gone" ? "draining" : n.state)),
      el("td", {}, n.job || "–"), el("td", { class: n.heartbeat_age_s > 10 ? "late" : "" }, ago(n.heartbeat_age_s)),
      el("td", {}, n.price_usd_h === null || n.price_usd_h === undefined ? "–" : `$${n.price_usd_h.toFixed(3)}/h`),
      el("td", {}, drain));
  });
  fill("nodes", rows, "nodes-empty");
}

function renderSummary(s) {
  state.summary = s;
  const box = document.getElementById("counts");
  // Each count filters the jobs table to its status; a second click shows every job again.
  const parts = Object.entries(s.counts).filter(([status, n]) => n > 0 || status === state.filter)
    .map(([status, n]) => el("button", { type: "button", "data-status": status, "aria-pressed": String(status === state.filter),
                                         class: `status ${status}${status === state.filter ? " active" : ""}`,
                                         onclick: () => filterJobs(status) }, `${n} ${status}`));
  parts.push(el("span", { class: "nodes-alive" }, `${s.nodes_alive} node${s.nodes_alive === 1 ? "" : "s"}`));
  box.replaceChildren(...parts);
}

function filterJobs(status) {
  state.filter = state.filter === status ? null : status;
  if (state.summary) renderSummary(state.summary);
  renderJobs(state.jobs);
}

function renderSpend(s) {
  const box = document.getElementById("spend");
  box.textContent = s.text;
  box.classList.toggle("near-cap", s.cap_usd !== null && s.spent_usd !== null && s.spent_usd >= 0.8 * s.cap_usd);
}

// -- one job --------------------------------------------------------------------------------------------
const LOSS_KEYS = ["train_loss", "val_loss"];
const SCORE_KEYS = ["val_iou", "val_acc", "val_psnr"];
const COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea"];

function chart(svgId, curve, keys) {
  const svg = document.getElementById(svgId);
  const NS = "http://www.w3.org/2000/svg";
  const W = 420, H = 180, L = 44, R = 8, T = 10, B = 24;
  const series = keys.filter((k) => curve.some((p) => typeof p[k] === "number"));
  svg.replaceChildren();
  const mk = (tag, attrs, text) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    svg.append(n);
    return n;
  };
  if (!series.length) {
    mk("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "nodata" }, "no epochs reported yet");
    return;
  }
  const xs = curve.map((p) => p.epoch);
  const ys = series.flatMap((k) => curve.filter((p) => typeof p[k] === "number").map((p) => p[k]));
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const Y = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  mk("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" });
  mk("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" });
  mk("text", { x: L - 4, y: T + 8, "text-anchor": "end", class: "tick" }, y1.toPrecision(3));
  mk("text", { x: L - 4, y: H - B, "text-anchor": "end", class: "tick" }, y0.toPrecision(3));
  mk("text", { x: L, y: H - 6, class: "tick" }, `epoch ${x0}`);
  mk("text", { x: W - R, y: H - 6, "text-anchor": "end", class: "tick" }, `${x1}`);
  series.forEach((k, i) => {
    const pts = curve.filter((p) => typeof p[k] === "number").map((p) => `${X(p.epoch).toFixed(1)},${Y(p[k]).toFixed(1)}`);
    mk("polyline", { points: pts.join(" "), fill: "none", stroke: COLOURS[i % COLOURS.length], "stroke-width": 2,
                     class: `series ${k}` });
    mk("text", { x: L + 70 + i * 90, y: H - 6, fill: COLOURS[i % COLOURS.length], class: "legend" }, k);
  });
}

function renderDetail(d) {
  state.detail = d;
  document.getElementById("detail").hidden = false;
  document.getElementById("detail-id").textContent = d.name ? `${d.name} (${d.id})` : d.id;
  const head = document.getElementById("detail-head");
  const facts = [["status", statusBadge(d.status)], ["kind", `${d.task} ${d.kind}`],
    ["epochs", d.epochs_total ? `${d.epochs_done}/${d.epochs_total}` : `${d.epochs_done}`],
    ["node", d.node || "–"], ["image", d.image], ["labels", d.labels], ["model", d.model], ["output", d.output],
    ["error", d.error]];
  if (d.blocks) facts.push(["blocks", `${d.blocks.done || 0}/${d.blocks.total || "?"}`]);
  const metrics = Object.entries(d.metrics || {}).map(([k, v]) => `${k} ${Number(v).toPrecision(4)}`).join("  ");
  if (metrics) facts.push(["metrics", metrics]);
  const dl = el("dl", {});
  for (const [k, v] of facts) if (v !== null && v !== undefined && v !== "") dl.append(el("dt", {}, k), el("dd", {}, v));
  const actions = d.cancellable
    ? el("button", { type: "button", class: "cancel", id: "detail-cancel", onclick: (e) => cancelJob(d.id, e.target) },
         "cancel job")
    : null;
  head.replaceChildren(dl, actions || "");
  chart("chart-loss", d.curve, LOSS_KEYS);
  chart("chart-score", d.curve, SCORE_KEYS);
  const now = Date.now() / 1000;
  const rows = d.attempt_list.map((a) => el("tr", {},
    el("td", {}, a.token), el("td", {}, a.node || "–"), el("td", {}, statusBadge(a.outcome)),
    el("td", {}, `${a.epochs_start} → ${a.epochs_done}`),
    el("td", {}, a.started_at ? duration((a.ended_at || now) - a.started_at) : "–"), el("td", {}, a.error || "")));
  document.querySelector("#attempts tbody").replaceChildren(...rows);
  // The attempts' logs are uploaded when each attempt ends: read them again when the history grows.
  const key = `${d.id}:${d.events.length}:${d.status}`;
  if (key !== state.logsKey) {
    state.logsKey = key;
    loadLogs(d.id);
  }
}

async function loadLogs(id) {
  const pre = document.getElementById("logs");
  try {
    const r = await fetch(`/api/jobs/${encodeURIComponent(id)}/logs`);
    const body = await r.json();
    if (!r.ok) throw new Error(body.detail || `HTTP ${r.status}`);
    if (state.selected !== id) return;
    pre.textContent = body.lines.join("\n") || "(no log lines yet)";
    pre.scrollTop = pre.scrollHeight;
  } catch (e) {
    pre.textContent = `logs unavailable: ${e.message}`;
  }
}

function select(id) {
  if (state.selected === id) return;
  state.selected = id;
  state.logsKey = null;
  document.getElementById("logs").textContent = "…";
  if (location.hash !== `#${id}`) history.replaceState(null, "", id ? `#${id}` : location.pathname);
  for (const tr of document.querySelectorAll("#jobs tbody tr")) tr.classList.toggle("selected", tr.dataset.job === id);
  if (!id) document.getElementById("detail").hidden = true;
  connect();
}

// -- the stream ----------------------------------------------------------------------------------------
function connect() {
  if (state.source) state.source.close();
  const url = state.selected ? `/api/events?job=${encodeURIComponent(state.selected)}` : "/api/events";
  const source = new EventSource(url);
  state.source = source;
  const live = document.getElementById("live");
  const on = (name, fn) => source.addEventListener(name, (e) => {
    try { fn(JSON.parse(e.data)); } catch (err) { console.error(`bad ${name} event`, err); }
  });
  on("summary", renderSummary);
  on("jobs", renderJobs);
  on("queue", renderQueue);
  on("nodes", renderNodes);
  on("spend", renderSpend);
  on("job", (d) => {
    if (d === null) say(`no job ${state.selected}`, true);
    else if (d.id === state.selected) renderDetail(d);
  });
  source.onopen = () => { live.textContent = "live"; live.className = "live on"; };
  source.onerror = () => { live.textContent = "reconnecting…"; live.className = "live off"; };
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("detail-close").addEventListener("click", () => select(null));
  const fromHash = decodeURIComponent(location.hash.slice(1));
  if (fromHash) select(fromHash); else connect();
});
