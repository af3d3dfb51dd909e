// dlorch wizard: paint labels on one slice at a time, train candidates, compare, pick, correct, retrain, export.
// Label maps live here as Uint8Array class ids per slice, drawn through a colour table (no anti-aliasing);
// each stroke sends its bounding box under the next revision, one request at a time, in order.
"use strict";

const MAIN = 640;  // the paint canvas's side; the candidates' canvases scale the same view to their size
const W = {
  state: null, z: 0, tool: "brush", cls: 1, size: 6, lo: 0, hi: 255,
  view: { cx: 0, cy: 0, zoom: 1 },   // image point at the canvas centre, screen pixels per image pixel (main)
  rev: 0, queue: Promise.resolve(), pending: 0, roundTrips: [],
  slices: new Map(),                 // "layer:z" -> Uint8Array of that slice
  undo: [], redo: [], stroke: null, box: null, drag: null,
  offscreen: new Map(),              // "kind:layer:z" -> canvas, rebuilt when its slice changes
  cards: new Map(),                  // layer -> canvas of a candidate (or the disagreement)
};
const $ = (id) => document.getElementById(id);
const esc = (t) => String(t).replace(/[&<>"']/g, (ch) => `&#${ch.charCodeAt(0)};`);
const shape = () => W.state.shape;  // [Z, Y, X]

// ---- the server -----------------------------------------------------------------------------------------
async function api(path, body, raw) {
  const init = body === undefined ? {} : { method: "POST", headers: raw ? raw : { "Content-Type": "application/json" },
    body: raw ? body : JSON.stringify(body) };
  const r = await fetch(path, init);
  const data = await r.json().catch(() => ({ error: `${path}: HTTP ${r.status}` }));
  if (!r.ok) {
    const d = data.detail, e = new Error(typeof d === "string" ? d : data.error || JSON.stringify(d) || r.statusText);
    e.gap = data.gap; throw e;
  }
  return data;
}
function message(text, kind) {
  const m = $("message");
  m.textContent = text || ""; m.hidden = !text; m.className = kind || "";
}
const CACHE_BYTES = 256e6;  // slices kept for going back and forth; a 512^3 volume's are not all kept
function forget() {  // the slices seen longest ago, and every offscreen image of a slice not shown
  let bytes = 0;
  for (const v of W.slices.values()) bytes += v.length;
  for (const [key, v] of W.slices) {
    if (bytes <= CACHE_BYTES) break;
    if (key.endsWith(`:${W.z}`)) continue;
    W.slices.delete(key); bytes -= v.length;
  }
  for (const key of [...W.offscreen.keys()]) if (!key.endsWith(`:${W.z}`)) W.offscreen.delete(key);
}
async function slice(layer, z, fresh) {
  const key = `${layer}:${z}`;
  if (!fresh && W.slices.has(key)) {
    const data = W.slices.get(key);
    W.slices.delete(key); W.slices.set(key, data);  // most recently used last
    return data;
  }
  const r = await fetch(`/api/slice/${layer}?z=${z}`);
  if (!r.ok) throw new Error((await r.json()).detail);
  const data = new Uint8Array(await r.arrayBuffer());
  W.slices.set(key, data);
  for (const k of [...W.offscreen.keys()]) if (k.endsWith(`:${key}`)) W.offscreen.delete(k);
  forget();
  return data;
}
function send(task) {  // requests that change labels go one at a time, in revision order
  W.pending++;
  W.queue = W.queue.then(task).catch(async (e) => {
    message(e.message);
    if (e.gap) await reloadLabels();
  }).finally(() => { W.pending--; });
  return W.queue;
}

// ---- colours and offscreen images -----------------------------------------------------------------------
function rgb(hex) { const n = parseInt(hex.slice(1), 16); return [(n >> 16) & 255, (n >> 8) & 255, n & 255]; }
function colourTable() {
  const t = new Uint8Array(256 * 3);
  for (const c of W.state.classes) t.set(rgb(c.color), c.id * 3);
  return t;
}
function canvasOf(key, fill) {
  let c = W.offscreen.get(key);
  if (!c) {
    const [, Y, X] = shape();
    c = document.createElement("canvas"); c.width = X; c.height = Y;
    fill(c, 0, 0, X, Y);
    W.offscreen.set(key, c);
  }
  return c;
}
function paintRegion(c, data, x, y, w, h, pixel) {  // pixel(value, out, i) writes RGBA
  const X = shape()[2], ctx = c.getContext("2d"), img = ctx.createImageData(w, h), out = img.data;
  for (let r = 0; r < h; r++) for (let q = 0; q < w; q++) pixel(data[(y + r) * X + x + q], out, (r * w + q) * 4);
  ctx.putImageData(img, x, y);
}
function imageCanvas(z) {
  const data = W.slices.get(`image:${z}`);
  const lut = new Uint8Array(256), span = Math.max(1, W.hi - W.lo);
  for (let v = 0; v < 256; v++) lut[v] = Math.max(0, Math.min(255, Math.round((v - W.lo) * 255 / span)));
  const key = `img${W.lo}-${W.hi}:image:${z}`;
  for (const k of [...W.offscreen.keys()]) if (k.startsWith("img") && k !== key) W.offscreen.delete(k);
  return canvasOf(key, (c, x, y, w, h) => paintRegion(c, data, x, y, w, h, (v, o, i) => {
    o[i] = o[i + 1] = o[i + 2] = lut[v]; o[i + 3] = 255; }));
}
function labelFill(layer, alpha) {
  const table = colourTable();
  return (c, x, y, w, h) => paintRegion(c, W.slices.get(`${layer}:${W.z}`), x, y, w, h, (v, o, i) => {
    o[i] = table[v * 3]; o[i + 1] = table[v * 3 + 1]; o[i + 2] = table[v * 3 + 2]; o[i + 3] = v ? alpha : 0; });
}
function refresh(layer, z, x, y, w, h) {  // redraw only a stroke's box of a label map's offscreen image
  const c = W.offscreen.get(`lab190:${layer}:${z}`);
  if (c) labelFill(layer, 190)(c, x, y, w, h);
}
function labelCanvas(layer, z, alpha) { return canvasOf(`lab${alpha}:${layer}:${z}`, labelFill(layer, alpha)); }
function heatCanvas(layer, z) {
  const data = W.slices.get(`${layer}:${z}`);
  return canvasOf(`heat:${layer}:${z}`, (c, x, y, w, h) => paintRegion(c, data, x, y, w, h, (v, o, i) => {
    o[i] = 255; o[i + 1] = 40; o[i + 2] = 40; o[i + 3] = Math.round(v * 0.8); }));
}

// ---- drawing ----------------------------------------------------------------------------------------------
function transform(canvas) {
  const s = W.view.zoom * canvas.width / MAIN;
  return { s, tx: canvas.width / 2 - W.view.cx * s, ty: canvas.height / 2 - W.view.cy * s };
}
function drawLayers(canvas, layers) {
  const ctx = canvas.getContext("2d"), t = transform(canvas);
  ctx.setTransform(1, 0, 0, 1, 0, 0); ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.imageSmoothingEnabled = false;
  ctx.setTransform(t.s, 0, 0, t.s, t.tx, t.ty);
  for (const l of layers) if (l) ctx.drawImage(l, 0, 0);
  return ctx;
}
function chosenLayer() {
  if (!W.state) return null;
  for (const r of [...W.state.rounds].reverse()) if (r.choice) return r.candidates[r.choice];
  return null;
}
function draw() {
  if (!W.state || !W.slices.has(`image:${W.z}`)) return;
  const layers = [imageCanvas(W.z)];
  const chosen = chosenLayer();
  if ($("show-pred").checked && chosen && chosen.layer && W.slices.has(`${chosen.layer}:${W.z}`))
    layers.push(labelCanvas(chosen.layer, W.z, 70));
  if ($("show-labels").checked) {
    layers.push(labelCanvas("accepted", W.z, 110));
    layers.push(labelCanvas("painted", W.z, 190));
  }
  const ctx = drawLayers($("paint"), layers);
  if (W.box) {
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 2 / transform($("paint")).s;
    ctx.strokeRect(W.box.x0, W.box.y0, W.box.x1 - W.box.x0, W.box.y1 - W.box.y0);
  }
  for (const [layer, canvas] of W.cards) {
    if (!W.slices.has(`${layer}:${W.z}`)) continue;
    drawLayers(canvas, [imageCanvas(W.z), layer === "disagreement" ? heatCanvas(layer, W.z) : labelCanvas(layer, W.z, 120)]);
  }
}
function fit() {
  const [, Y, X] = shape();
  W.view = { cx: X / 2, cy: Y / 2, zoom: MAIN / Math.max(X, Y) };
}
function toImage(canvas, ev) {
  const r = canvas.getBoundingClientRect(), t = transform(canvas);
  const px = (ev.clientX - r.left) * canvas.width / r.width, py = (ev.clientY - r.top) * canvas.height / r.height;
  return { x: (px - t.tx) / t.s, y: (py - t.ty) / t.s };
}
// Page coordinates of an image pixel's centre on the paint canvas (used by scripted tests and the bench).
function toScreen(x, y) {
  const c = $("paint"), r = c.getBoundingClientRect(), t = transform(c);
  return { x: r.left + ((x + 0.5) * t.s + t.tx) * r.width / c.width, y: r.top + ((y + 0.5) * t.s + t.ty) * r.height / c.height };
}

// ---- painting ---------------------------------------------------------------------------------------------
function stamp(labels, p, value) {
  const [, Y, X] = shape(), r = W.size / 2, s = W.stroke;
  const x0 = Math.max(0, Math.floor(p.x - r + 0.5)), x1 = Math.min(X - 1, Math.floor(p.x + r - 0.5));
  const y0 = Math.max(0, Math.floor(p.y - r + 0.5)), y1 = Math.min(Y - 1, Math.floor(p.y + r - 0.5));
  for (let y = y0; y <= y1; y++) for (let x = x0; x <= x1; x++) {
    const dx = x + 0.5 - p.x, dy = y + 0.5 - p.y;
    if (dx * dx + dy * dy <= r * r || W.size <= 2) labels[y * X + x] = value;
  }
  if (x0 <= x1 && y0 <= y1) {
    s.x0 = Math.min(s.x0, x0); s.x1 = Math.max(s.x1, x1); s.y0 = Math.min(s.y0, y0); s.y1 = Math.max(s.y1, y1);
    const d = W.dirty;
    d.x0 = Math.min(d.x0, x0); d.x1 = Math.max(d.x1, x1); d.y0 = Math.min(d.y0, y0); d.y1 = Math.max(d.y1, y1);
  }
}
function strokeTo(p) {
  const labels = W.slices.get(`painted:${W.z}`), s = W.stroke, value = W.tool === "eraser" ? 0 : W.cls;
  const last = s.last || p, d = Math.hypot(p.x - last.x, p.y - last.y), n = Math.max(1, Math.ceil(d / Math.max(1, W.size / 3)));
  W.dirty = { x0: Infinity, x1: -1, y0: Infinity, y1: -1 };
  for (let i = 1; i <= n; i++) stamp(labels, { x: last.x + (p.x - last.x) * i / n, y: last.y + (p.y - last.y) * i / n }, value);
  s.last = p;
  const b = W.dirty;
  if (b.x1 >= b.x0) refresh("painted", W.z, b.x0, b.y0, b.x1 - b.x0 + 1, b.y1 - b.y0 + 1);
  draw();
}
function fill(p) {
  const [, Y, X] = shape(), labels = W.slices.get(`painted:${W.z}`), image = W.slices.get(`image:${W.z}`);
  const sx = Math.floor(p.x), sy = Math.floor(p.y);
  if (sx < 0 || sy < 0 || sx >= X || sy >= Y) return;
  const target = labels[sy * X + sx], base = image[sy * X + sx], tol = 12;
  if (target === W.cls) return;
  W.stroke = { z: W.z, before: labels.slice(), x0: sx, x1: sx, y0: sy, y1: sy };
  const stack = [sy * X + sx], seen = new Uint8Array(X * Y);
  seen[stack[0]] = 1;
  while (stack.length) {  // 4-connected: same label, intensity within the tolerance of the seed
    const i = stack.pop(), x = i % X, y = (i - x) / X;
    labels[i] = W.cls;
    const s = W.stroke; s.x0 = Math.min(s.x0, x); s.x1 = Math.max(s.x1, x); s.y0 = Math.min(s.y0, y); s.y1 = Math.max(s.y1, y);
    for (const j of [x > 0 ? i - 1 : -1, x < X - 1 ? i + 1 : -1, y > 0 ? i - X : -1, y < Y - 1 ? i + X : -1])
      if (j >= 0 && !seen[j] && labels[j] === target && Math.abs(image[j] - base) <= tol) { seen[j] = 1; stack.push(j); }
  }
  W.offscreen.delete(`lab190:painted:${W.z}`);
  finishStroke();
}
function region(data, X, x, y, w, h) {
  const out = new Uint8Array(w * h);
  for (let r = 0; r < h; r++) out.set(data.subarray((y + r) * X + x, (y + r) * X + x + w), r * w);
  return out;
}
function finishStroke() {
  const s = W.stroke; W.stroke = null;
  if (!s || s.x1 < s.x0) return;
  const X = shape()[2], x = s.x0, y = s.y0, w = s.x1 - s.x0 + 1, h = s.y1 - s.y0 + 1;
  const after = region(W.slices.get(`painted:${s.z}`), X, x, y, w, h), before = region(s.before, X, x, y, w, h);
  W.undo.push({ z: s.z, x, y, w, h, before, after }); W.redo = [];
  sendPatch(s.z, x, y, w, h, after);
}
function b64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}
function sendPatch(z, x, y, w, h, data) {
  return send(async () => {
    const t0 = performance.now(), rev = W.rev + 1;
    const ack = await api("/api/stroke", { layer: "painted", rev, z, y, x, h, w, data: b64(data) });
    W.roundTrips.push(performance.now() - t0);
    W.rev = ack.rev;
    W.state.counts = ack.counts; W.state.revision = ack.rev;
    showCounts();
  });
}
function applyPatch(entry, data) {
  const labels = W.slices.get(`painted:${entry.z}`), X = shape()[2];
  if (labels) for (let r = 0; r < entry.h; r++) labels.set(data.subarray(r * entry.w, (r + 1) * entry.w), (entry.y + r) * X + entry.x);
  refresh("painted", entry.z, entry.x, entry.y, entry.w, entry.h);
  sendPatch(entry.z, entry.x, entry.y, entry.w, entry.h, data);
  draw();
}
function undo() { const e = W.undo.pop(); if (e) { W.redo.push(e); applyPatch(e, e.before); } }
function redo() { const e = W.redo.pop(); if (e) { W.undo.push(e); applyPatch(e, e.after); } }

// ---- pointer: paint, fill, pan, accept box, zoom --------------------------------------------------------
function onDown(ev) {
  const canvas = ev.currentTarget, p = toImage(canvas, ev);
  canvas.setPointerCapture(ev.pointerId);
  if (ev.button === 1 || ev.button === 2 || ev.shiftKey || W.tool === "pan" || canvas !== $("paint")) {
    W.drag = { x: ev.clientX, y: ev.clientY, canvas }; return;
  }
  if (W.tool === "fill") { fill(p); draw(); return; }
  if (W.tool === "box") { W.box = { x0: p.x, y0: p.y, x1: p.x, y1: p.y }; return; }
  W.stroke = { z: W.z, before: W.slices.get(`painted:${W.z}`).slice(), x0: Infinity, x1: -1, y0: Infinity, y1: -1 };
  strokeTo(p);
}
function onMove(ev) {
  if (W.drag) {
    const s = transform(W.drag.canvas).s;
    W.view.cx -= (ev.clientX - W.drag.x) / s; W.view.cy -= (ev.clientY - W.drag.y) / s;
    W.drag.x = ev.clientX; W.drag.y = ev.clientY; draw(); return;
  }
  const p = toImage(ev.currentTarget, ev);
  if (W.stroke) strokeTo(p);
  else if (W.box) { W.box.x1 = p.x; W.box.y1 = p.y; draw(); }
}
function onUp() {
  W.drag = null;
  if (W.stroke) finishStroke();
  if (W.box) { const b = W.box; W.box = null; acceptBox(b); draw(); }
}
function onWheel(ev) {
  ev.preventDefault();
  const canvas = ev.currentTarget, p = toImage(canvas, ev), f = ev.deltaY < 0 ? 1.25 : 0.8;
  W.view.zoom = Math.min(64, Math.max(0.05, W.view.zoom * f));
  W.view.cx = p.x - (p.x - W.view.cx) / f; W.view.cy = p.y - (p.y - W.view.cy) / f;
  draw();
}
function hookCanvas(c) {
  c.addEventListener("pointerdown", onDown); c.addEventListener("pointermove", onMove);
  c.addEventListener("pointerup", onUp); c.addEventListener("wheel", onWheel, { passive: false });
  c.addEventListener("contextmenu", (e) => e.preventDefault());
}
function acceptBox(b) {
  const [, Y, X] = shape();
  const x = Math.max(0, Math.floor(Math.min(b.x0, b.x1))), y = Math.max(0, Math.floor(Math.min(b.y0, b.y1)));
  const w = Math.min(X, Math.ceil(Math.max(b.x0, b.x1))) - x, h = Math.min(Y, Math.ceil(Math.max(b.y0, b.y1))) - y;
  if (w < 1 || h < 1) return;
  const z = W.z, threshold = parseFloat($("threshold").value) || 0;
  send(async () => {
    const r = await api("/api/accept", { z, y, x, h, w, threshold });
    W.rev = r.rev; W.state.counts = r.counts; W.state.revision = r.rev;
    await slice("accepted", z, true);
    message(`accepted ${r.accepted} pixels`, "info"); showCounts(); draw();
  });
}

// ---- the record, the steps and the panels ---------------------------------------------------------------
function step() {
  const s = W.state, r1 = s.rounds[0];
  if (s.export) return "export";
  if (chosenLayer()) return "correct";
  if (r1 && Object.values(r1.candidates).every((c) => c.status === "ready" || c.status === "failed")) return "compare";
  return r1 ? "train" : "paint";
}
function showCounts() {
  const s = W.state, counts = {};
  for (const m of Object.values(s.counts)) m.forEach((n, id) => { if (id) counts[id] = (counts[id] || 0) + n; });
  let total = 0;
  for (const c of s.classes) {
    const el = document.querySelector(`#palette li[data-id="${c.id}"] .count`);
    if (el) el.textContent = (counts[c.id] || 0).toLocaleString("en");
    total += counts[c.id] || 0;
  }
  const t = $("counts-total");
  t.textContent = `${total.toLocaleString("en")} / ${s.advised_pixels.toLocaleString("en")} advised labelled pixels`;
  t.className = total >= s.advised_pixels ? "enough" : "";
  $("labelled-round").textContent = `labelled this round: ${(total - (s.rounds.length ? s.rounds[s.rounds.length - 1].labelled_at_start : 0)).toLocaleString("en")}`;
}
function showPalette() {
  const ul = $("palette");
  if (document.activeElement && ul.contains(document.activeElement)) return;  // not while a name is typed
  ul.innerHTML = "";
  for (const c of W.state.classes) {
    const li = document.createElement("li");
    li.dataset.id = c.id; li.className = c.id === W.cls ? "on" : "";
    li.innerHTML = `<span class="swatch"></span><input value=""><span class="count"></span>`;
    li.querySelector(".swatch").style.background = c.color;
    li.querySelector("input").value = c.name;
    li.querySelector(".swatch").onclick = () => { W.cls = c.id; showPalette(); };
    li.onclick = () => { if (W.cls !== c.id) { W.cls = c.id; showPalette(); } };
    li.querySelector("input").onchange = () => renameClasses();
    ul.appendChild(li);
  }
  showCounts();
}
function renameClasses(extra) {
  const names = [...document.querySelectorAll("#palette input")].map((i) => i.value);
  if (extra) names.push(extra);
  api("/api/classes", { names }).then((s) => { W.state = s; W.offscreen.clear(); showPalette(); draw(); })
    .catch((e) => message(e.message));
}
function candidateList() {
  const out = [];
  for (const r of W.state.rounds) for (const c of Object.values(r.candidates)) out.push({ round: r, c });
  return out;
}
function showCandidates() {
  const box = $("candidates"), latest = W.state.rounds[W.state.rounds.length - 1];
  $("compare").hidden = !W.state.rounds.length;
  const wanted = candidateList();
  if (W.state.layers.disagreement) wanted.push({ disagreement: true });
  for (const item of wanted) {
    const id = item.disagreement ? "disagreement" : `r${item.round.n}-${item.c.variant}`;
    let card = box.querySelector(`[data-card="${id}"]`);
    if (!card) {
      card = document.createElement("div"); card.className = "cand"; card.dataset.card = id;
      card.innerHTML = `<canvas width="212" height="212"></canvas><div class="meta"></div>`;
      hookCanvas(card.querySelector("canvas"));
      if (!item.disagreement) {
        const b = document.createElement("button"); b.textContent = "Pick"; b.className = "pick";
        b.onclick = () => api("/api/pick", { candidate: item.c.variant }).then(update).catch((e) => message(e.message));
        card.appendChild(b);
      }
      box.appendChild(card);
    }
    const meta = card.querySelector(".meta"), canvas = card.querySelector("canvas");
    if (item.disagreement) {
      meta.innerHTML = `<span class="name">disagreement</span><br>where the candidates differ`;
      W.cards.set("disagreement", canvas);
      continue;
    }
    const c = item.c, r = item.round;
    card.dataset.variant = c.variant; card.dataset.status = c.status;
    card.classList.toggle("chosen", r.choice === c.variant);
    const score = c.score == null ? "-" : c.score.toFixed(3);
    meta.innerHTML = `<span class="name">${r.n > 1 ? "round " + r.n + ": " : ""}${esc(c.variant)}</span> ${esc(c.status)}<br>` +
      `epoch ${c.epoch}/${c.epochs_total || "?"} · held-out ${score}${c.node ? " · " + esc(c.node) : ""}` +
      (c.error ? `<br>${esc(c.error.slice(0, 160))}` : "");
    card.querySelector(".pick").disabled = !(c.status === "ready" && r === latest && Object.keys(r.candidates).length > 1);
    if (c.layer) W.cards.set(c.layer, canvas);
  }
}
async function loadSlice(z) {
  const layers = ["image", "painted", "accepted", ...W.cards.keys()];
  const chosen = chosenLayer();
  if (chosen && chosen.layer) layers.push(chosen.layer);
  await Promise.all([...new Set(layers)].map((l) => slice(l, z)));
}
async function reloadLabels() {
  W.state = await api("/api/state");
  W.rev = W.state.revision;
  await Promise.all(["painted", "accepted"].map((l) => slice(l, W.z, true)));
  W.undo = []; W.redo = []; showCounts(); draw();
}
async function update(state) {
  const first = !W.state;
  W.state = state;
  if (first) {
    W.rev = state.revision; fit();
    $("slice").max = state.shape[0] - 1; $("slice-row").hidden = state.shape[0] === 1;
    $("session").textContent = state.session;
  } else if (!W.pending && !W.stroke && state.revision !== W.rev) {
    await reloadLabels();  // labels were loaded or changed elsewhere
  }
  for (const el of document.querySelectorAll("#steps span")) el.classList.toggle("on", el.dataset.step === step());
  $("train").disabled = state.rounds.length > 0;
  const chosen = chosenLayer(), running = state.rounds.length &&
    Object.values(state.rounds[state.rounds.length - 1].candidates).some((c) => c.status === "training" || c.status === "predicting");
  $("correct").hidden = !chosen;
  $("tool-box").disabled = !chosen;
  $("retrain").disabled = !chosen || running;
  $("export").disabled = !chosen || (state.export && state.export.status === "predicting");
  const r = state.rounds[state.rounds.length - 1];
  $("round-info").textContent = r ? `round ${r.n}: ${Object.values(r.candidates).map((c) => c.status).join(", ")}` : "";
  const ex = state.export;
  $("export-files").innerHTML = ex ? [...ex.files, ex.status === "done" ? `done: ${ex.dir}` : `export ${ex.status}` +
    (ex.error ? `: ${ex.error}` : "")].map((f) => `<li>${esc(f)}</li>`).join("") : "";
  if (state.error) message(state.error);
  showPalette(); showCandidates();
  await loadSlice(W.z).catch((e) => message(e.message));
  draw();
}

// ---- wiring -----------------------------------------------------------------------------------------------
function setTool(t) {
  W.tool = t;
  for (const b of document.querySelectorAll("#toolbar button")) b.classList.toggle("on", b.dataset.tool === t);
}
function wire() {
  hookCanvas($("paint"));
  window.addEventListener("pointerup", onUp);
  for (const b of document.querySelectorAll("#toolbar button")) b.onclick = () => setTool(b.dataset.tool);
  $("size").oninput = () => { W.size = +$("size").value; $("size-value").textContent = W.size; };
  $("undo").onclick = undo; $("redo").onclick = redo;
  $("add-class").onclick = () => renameClasses(`class ${W.state.classes.length + 1}`);
  $("slice").oninput = async () => {
    W.z = +$("slice").value; $("slice-value").textContent = W.z;
    await loadSlice(W.z).catch((e) => message(e.message)); draw();
  };
  for (const id of ["lo", "hi"]) $(id).oninput = () => { W.lo = +$("lo").value; W.hi = +$("hi").value; draw(); };
  for (const id of ["show-labels", "show-pred"]) $(id).onchange = draw;
  $("train").onclick = () => {
    $("train").disabled = true;
    message("submitting the candidates' training jobs", "info");
    api("/api/train", {}).then((s) => { message(""); return update(s); })
      .catch((e) => { $("train").disabled = false; message(e.message); });
  };
  $("retrain").onclick = () => send(() => api("/api/retrain", {}).then((s) => { message(""); return update(s); }));
  $("export").onclick = () => api("/api/export", {}).then(update).catch((e) => message(e.message));
  $("suggest").onclick = () => api("/api/suggest").then(showSuggestions).catch((e) => message(e.message));
  $("labels-file").onchange = async (ev) => {
    const f = ev.target.files[0];
    if (!f) return;
    try {
      const s = await api("/api/labels", await f.arrayBuffer(), { "Content-Type": "application/octet-stream", "X-Filename": f.name });
      message(`loaded labels from ${f.name}`, "info");
      W.state = s; await reloadLabels(); showPalette();
    } catch (e) { message(e.message); }
    ev.target.value = "";
  };
  window.addEventListener("keydown", (ev) => {
    if (ev.target.tagName === "INPUT") return;
    if ((ev.ctrlKey || ev.metaKey) && ev.key === "z") { ev.preventDefault(); undo(); return; }
    if ((ev.ctrlKey || ev.metaKey) && ev.key === "y") { ev.preventDefault(); redo(); return; }
    const t = { b: "brush", e: "eraser", f: "fill", p: "pan", a: "box" }[ev.key];
    if (t && !(t === "box" && $("tool-box").disabled)) setTool(t);
  });
}
function showSuggestions(r) {
  const ol = $("suggestions");
  ol.innerHTML = "";
  for (const t of r.tiles) {
    const li = document.createElement("li"), z = t.slice ?? t.z ?? 0;
    li.textContent = `slice ${z}, y ${t.y}, x ${t.x} (${t.h}x${t.w}), score ${(+t.score).toFixed(3)}`;
    li.onclick = async () => {
      W.z = z; $("slice").value = z; $("slice-value").textContent = z;
      W.view.cx = t.x + t.w / 2; W.view.cy = t.y + t.h / 2; W.view.zoom = Math.max(W.view.zoom, MAIN / (2 * Math.max(t.h, t.w)));
      await loadSlice(z); draw();
    };
    ol.appendChild(li);
  }
}
async function main() {
  wire();
  await update(await api("/api/state"));
  const events = new EventSource("/api/events");
  events.addEventListener("state", (ev) => update(JSON.parse(ev.data)).catch((e) => message(e.message)));
}
window.wizard = { W, toScreen, roundTrips: () => W.roundTrips, idle: () => W.pending === 0 };
main().catch((e) => message(e.message));
