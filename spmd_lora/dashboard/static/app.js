// spmd-lora dashboard: polls the JSON endpoints and draws SVG line charts (no libraries).
"use strict";
const COLORS = ["#3b6fb6", "#d9822b", "#3c9d5d", "#b8405e", "#7a5cb8", "#6b6b6b", "#c4a000"];
const KEYS = ["loss", "eval_loss", "lr", "grad_norm", "tokens_per_s"];
const SVGNS = "http://www.w3.org/2000/svg";
const state = { runs: [], rows: {}, next: {}, logNext: {}, logText: {} };

function el(tag, attrs = {}, text) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVGNS, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmt(v) {
  if (v === null || v === undefined) return "";
  if (typeof v !== "number") return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
  if (a >= 100) return Math.round(v).toString();
  return parseFloat(v.toPrecision(4)).toString();
}

function bytes(n) {
  if (n === null || n === undefined) return "";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 2 : 0) + " " + u[i];
}

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (!r.ok) {
    const j = await r.json().catch(() => ({}));
    throw new Error(`${url}: HTTP ${r.status}` + (j.error ? ` (${j.error})` : ""));
  }
  return r.json();
}

function drawChart(fig) {
  const key = fig.dataset.key;
  const W = 380, H = 200, L = 56, R = 10, T = 8, B = 24;
  const series = state.runs.map((run, i) => ({
    run, color: COLORS[i % COLORS.length],
    pts: (state.rows[run.id] || []).filter(r => typeof r[key] === "number" && isFinite(r[key]))
      .map(r => [r.step, r[key]]),
  })).filter(s => s.pts.length);
  const old = fig.querySelector("svg"); if (old) old.remove();
  fig.hidden = !series.length && fig.dataset.optional === "1";   // rag generation / dpo metrics: only when logged
  const svg = el("svg:svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", "data-key": key,
                              "data-series": series.length });
  if (!series.length) {
    svg.appendChild(el("svg:text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "no data yet"));
    fig.appendChild(svg); return;
  }
  const all = series.flatMap(s => s.pts);
  let x0 = Math.min(...all.map(p => p[0])), x1 = Math.max(...all.map(p => p[0]));
  let y0 = Math.min(...all.map(p => p[1])), y1 = Math.max(...all.map(p => p[1]));
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.05 + 1e-9; y1 += Math.abs(y1) * 0.05 + 1e-9; }
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = y => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  svg.appendChild(el("svg:line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
  svg.appendChild(el("svg:line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  for (const [y, v] of [[sy(y1), y1], [sy((y0 + y1) / 2), (y0 + y1) / 2], [sy(y0), y0]])
    svg.appendChild(el("svg:text", { x: L - 4, y: y + 3, "text-anchor": "end" }, fmt(v)));
  svg.appendChild(el("svg:text", { x: L, y: H - 8 }, "step " + x0));
  svg.appendChild(el("svg:text", { x: W - R, y: H - 8, "text-anchor": "end" }, "step " + x1));
  for (const s of series) {
    const d = s.pts.map(p => sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" ");
    svg.appendChild(el("svg:polyline", {
      class: "series", points: d, stroke: s.color, "data-run": s.run.id,
      "data-points": s.pts.length, "data-last": s.pts[s.pts.length - 1][1] }));
    if (s.pts.length === 1)
      svg.appendChild(el("svg:circle", { cx: sx(s.pts[0][0]), cy: sy(s.pts[0][1]), r: 3, fill: s.color }));
  }
  fig.appendChild(svg);
}

function table(obj) {
  const t = el("table");
  for (const [k, v] of Object.entries(obj || {})) {
    const tr = el("tr"); tr.appendChild(el("th", {}, k));
    tr.appendChild(el("td", {}, typeof v === "object" && v !== null ? JSON.stringify(v) : fmt(v)));
    t.appendChild(tr);
  }
  return t;
}

function rowsTable(rows, cols) {
  const t = el("table"), head = el("tr");
  cols.forEach(c => head.appendChild(el("th", {}, c[0]))); t.appendChild(head);
  for (const r of rows) {
    const tr = el("tr"); cols.forEach(c => tr.appendChild(el("td", {}, c[1](r)))); t.appendChild(tr);
  }
  return t;
}

function renderInfo(run, s) {
  const box = el("div", { class: "info" });
  const color = COLORS[run.id % COLORS.length];
  const h = el("h2"); h.appendChild(el("span", { style: `color:${color}` }, "■ "));
  h.appendChild(document.createTextNode(s.name + " ")); h.appendChild(el("span", { class: "status" }, "(" + s.status + ")"));
  box.appendChild(h);
  box.appendChild(el("div", { class: "path" }, s.path));
  if (s.message) box.appendChild(el("p", { class: "message" }, s.message));
  if (s.exists === false) return box;          // a missing run directory: nothing else to say
  const rows = state.rows[run.id] || [];
  const last = [...rows].reverse().find(r => "loss" in r);
  const evals = rows.filter(r => "eval_loss" in r);
  const cols = el("div", { class: "cols" });
  const progress = el("div");
  progress.appendChild(el("h3", {}, "progress"));
  progress.appendChild(table({
    step: last ? `${last.step} / ${s.total_steps ?? "?"}` : "-",
    loss: last ? last.loss : "-",
    "eval loss (first → last)": evals.length ? `${fmt(evals[0].eval_loss)} → ${fmt(evals[evals.length - 1].eval_loss)}` : "-",
    "tokens/s": last ? last.tokens_per_s : "-",
  }));
  cols.appendChild(progress);
  const mem = el("div"); mem.appendChild(el("h3", {}, "mesh and memory per device"));
  const m = s.memory || {}, cs = m.compiled_step;
  mem.appendChild(table({
    mesh: s.mesh ? Object.entries(s.mesh.axes).map(([a, n]) => `${a}=${n}`).join(" ") + " on " + s.mesh.platform : "-",
    "compiled step peak": cs ? bytes(cs.peak) : "no census.json (trained with --no-census?)",
    "  arguments / temporaries": cs ? `${bytes(cs.argument)} / ${bytes(cs.temp)}` : "",
    "measured peak (GPU)": m.measured_peak_bytes ? bytes(m.measured_peak_bytes) : "not reported by this device",
  }));
  cols.appendChild(mem);
  const ck = el("div"); ck.appendChild(el("h3", {}, "checkpoints on disk"));
  ck.appendChild(s.checkpoints.length ? rowsTable(s.checkpoints, [["name", c => c.name], ["size", c => bytes(c.bytes)]])
                                      : el("p", {}, "none"));
  ck.appendChild(el("p", {}, s.adapter ? "adapter/ written" : "adapter not written yet"));
  cols.appendChild(ck);
  box.appendChild(cols);
  if (s.census) {
    box.appendChild(el("h3", {}, `collective census of the train step (compiled in ${s.census.compile_s} s on ${s.census.backend})`));
    box.appendChild(rowsTable(s.census.summary || [], [["kind", r => r.kind], ["axis", r => r.axis], ["ops/step", r => r.ops],
      ["bytes/step", r => bytes(r.program_bytes)]]));
    const meas = s.census.measured || {};
    box.appendChild(el("p", {}, `tp activation all-reduces per step: ${meas.tp_activation_reductions ?? "?"}; ` +
      `LoRA gradient reductions: ${meas.lora_grad_reductions ?? "?"}; collectives other than all-reduce: ${meas.non_all_reduce_ops ?? "?"}`));
    const all = el("details"); all.appendChild(el("summary", {}, "every collective"));
    all.appendChild(rowsTable(s.census.rows || [], [["kind", r => r.kind], ["axis", r => r.axis],
      ["shapes", r => (r.program_shapes || r.shapes || []).join(" ")], ["count/step", r => r.count],
      ["phase", r => r.phase], ["source", r => r.source]]));
    box.appendChild(all);
  }
  if (s.eval_samples && s.eval_samples.samples.length) {
    const ev = el("div"); ev.appendChild(el("h3", {}, `generated answers at step ${s.eval_samples.step}`));
    ev.appendChild(rowsTable(s.eval_samples.samples, [["question", r => r.question],
      ["answer", r => r.generated], ["reference", r => r.reference]]));
    box.appendChild(ev);
  }
  if (s.export_commands && s.export_commands.length) {
    const ex = el("div", { class: "export" }); ex.appendChild(el("h3", {}, "take it elsewhere"));
    for (const c of s.export_commands) ex.append(el("p", {}, c.what), el("pre", {}, c.command));
    box.appendChild(ex);
  }
  if (s.config) {
    const d = el("details"); d.appendChild(el("summary", {}, "resolved run config"));
    d.appendChild(table(s.config)); if (s.model) { d.appendChild(el("h3", {}, "model")); d.appendChild(table(s.model)); }
    box.appendChild(d);
  }
  return box;
}

// A run's box keeps its prompt box across polls (typing is not interrupted); the rest is redrawn.
function runBox(run, s) {
  let box = document.getElementById("run-" + run.id);
  if (!box) {
    box = el("div", { class: "run", id: "run-" + run.id });
    box.append(el("div", { class: "info" }), el("div", { class: "prompt-slot" }), el("div", { class: "log-slot" }));
  }
  box.querySelector(".info").replaceWith(renderInfo(run, s));
  const slot = box.querySelector(".prompt-slot");
  if (s.adapter && s.config && !slot.firstChild) slot.appendChild(promptBox(run));
  const log = state.logText[run.id];
  if (log) {
    box.querySelector(".log-slot").replaceChildren(el("h3", {}, "train.log"),
      el("pre", { class: "log" }, log.slice(-20000)));
  }
  return box;
}

function promptBox(run) {
  const d = el("div", { class: "prompt" });
  d.appendChild(el("h3", {}, "try the adapter"));
  const input = el("input", { size: 60, placeholder: "a prompt (wrapped in the run's template)" });
  const button = el("button", {}, "generate");
  const out = el("pre", { class: "completion" });
  button.addEventListener("click", async () => {
    out.textContent = "generating (loads the model in a child process)…";
    const r = await fetch(`/api/runs/${run.id}/generate`, { method: "POST",
      headers: { "Content-Type": "application/json", "X-Spmd-Lora": "1" },
      body: JSON.stringify({ prompt: input.value }) });
    const j = await r.json();
    out.textContent = j.completion !== undefined ? j.completion : "error: " + j.error;
  });
  d.append(input, button, out);
  return d;
}

async function poll() {
  try {
    state.runs = await getJSON("/api/runs");
    const container = document.getElementById("runs");
    const boxes = [];
    for (const run of state.runs) {
      const since = state.next[run.id] || 0;
      const m = await getJSON(`/api/runs/${run.id}/metrics?since=${since}`);
      state.rows[run.id] = (state.rows[run.id] || []).concat(m.rows);
      state.next[run.id] = m.next;
      const lg = await getJSON(`/api/runs/${run.id}/log?offset=${state.logNext[run.id] || 0}`);
      state.logText[run.id] = (state.logText[run.id] || "") + lg.text; state.logNext[run.id] = lg.next;
      boxes.push(runBox(run, await getJSON(`/api/runs/${run.id}/summary`)));
    }
    for (const b of boxes) if (b.parentNode !== container) container.appendChild(b);   // runs only get added
    const legend = document.getElementById("legend");
    legend.replaceChildren(...state.runs.map(r => {
      const s = el("span"); const sw = el("i", { style: `background:${COLORS[r.id % COLORS.length]}` });
      s.appendChild(sw); s.appendChild(document.createTextNode(`${r.name} (${r.status})`)); return s;
    }));
    document.querySelectorAll("figure.chart").forEach(drawChart);
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
  } catch (e) {
    // fetch() throws a TypeError when the server cannot be reached; getJSON an Error on a 4xx/5xx
    document.getElementById("updated").textContent =
      (e instanceof TypeError ? "dashboard unreachable: " : "dashboard error: ") + e.message;
  }
}

document.getElementById("new-start").addEventListener("click", async () => {
  const out = document.getElementById("new-result");
  let config;
  try { config = JSON.parse(document.getElementById("new-config").value); }
  catch (e) { out.textContent = "config is not valid JSON: " + e.message; return; }
  const r = await fetch("/api/runs", { method: "POST", headers: { "Content-Type": "application/json", "X-Spmd-Lora": "1" },
    body: JSON.stringify({ name: document.getElementById("new-name").value, config }) });
  const j = await r.json();
  out.textContent = r.ok ? `started in ${j.path} (pid ${j.pid})` : "error: " + j.error;
  poll();
});

getJSON("/api/new-run-template").then(t => {
  document.getElementById("new-config").value = JSON.stringify(t, null, 2);
}).catch(() => {});
poll();
setInterval(poll, 2000);
