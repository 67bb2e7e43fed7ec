// The fleet dashboard: polls the API's read endpoints and draws them (no state of its own).
"use strict";

const POLL_MS = 2000;
const STEP_OF_WINDOW = { 300: 5, 900: 15, 3600: 60 };
const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed"];

const dashboard = { charts: {}, series: null, metrics: null, stats: null, workers: null, polls: 0 };
window.dashboard = dashboard;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(child == null ? "" : String(child)));
  }
  return node;
}

function fmt(value, digits = 1) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(digits);
  return String(value);
}

function mb(bytes) {
  return bytes == null ? "–" : (bytes / 2 ** 20).toFixed(1) + " MB";
}

function clock(epoch) {
  return new Date(epoch * 1000).toLocaleTimeString();
}

async function getJSON(path) {
  const response = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

async function manage(method, path, body) {
  const response = await fetch(path, {
    method,
    credentials: "same-origin",
    headers: { "X-Dashboard": "1", "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let detail = text;
  try { detail = JSON.stringify(JSON.parse(text).detail ?? JSON.parse(text)); } catch (_) { /* text */ }
  return { ok: response.ok, status: response.status, detail };
}

// -- model versions -----------------------------------------------------------------------
function chartOptions(title, labels, width, twoScales) {
  const floor = (u, min, max) => [0, Math.max(1, max * 1.1)];
  // Instances and requests differ by orders of magnitude: the second series gets its own axis.
  const scaleOf = (i) => (twoScales && i === 1 ? "r" : "y");
  return {
    title,
    width,
    height: 170,
    scales: { x: { time: true }, y: { range: floor }, r: { range: floor } },
    // Points shown: a step with traffic between idle ones has no line to draw.
    series: [{}, ...labels.map((label, i) => ({
      label, scale: scaleOf(i), stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: false,
      points: { show: true, size: 4 },
    }))],
    axes: twoScales
      ? [{}, { scale: "y", size: 40 }, { scale: "r", side: 1, size: 50, grid: { show: false } }]
      : [{}, { size: 50 }],
    legend: { live: false },
  };
}

function modelCharts(label, series) {
  const points = series.models[label];
  const t = series.t.map((start) => start + series.step_seconds); // drawn at each step's end
  const queuedRunning = points.average_queue_depth.map((q, i) =>
    q === null && points.average_running[i] === null ? null : (q || 0) + (points.average_running[i] || 0));
  return {
    instances: [t, points.average_instances, queuedRunning],
    rps: [t, points.requests_per_second, points.errors.map((e) => e / series.step_seconds)],
    latency: [t, points.p50_response_time_ms, points.p95_response_time_ms, points.p99_response_time_ms],
  };
}

const CHARTS = {
  instances: ["instances vs queued + running", ["instances", "queued + running"]],
  rps: ["requests/s", ["requests/s", "errors/s"]],
  latency: ["latency (ms)", ["p50", "p95", "p99"]],
};

const STAT_FIELDS = [
  ["requests", "requests"],
  ["errors", "errors"],
  ["requests_per_second", "req/s"],
  ["p50_response_time_ms", "p50 ms"],
  ["p95_response_time_ms", "p95 ms"],
  ["p99_response_time_ms", "p99 ms"],
  ["cold_starts", "cold starts"],
  ["average_cold_start_ms", "cold start ms"],
  ["average_load_time_ms", "load ms"],
  ["average_batch_size", "batch"],
];

function renderModels(series, metrics, stats) {
  const root = document.getElementById("models");
  const labels = Object.keys(series.models);
  if (!labels.length) return;
  root.querySelector("p.muted")?.remove();
  for (const label of labels) {
    let card = root.querySelector(`[data-model="${CSS.escape(label)}"]`);
    if (!card) {
      card = el("div", { class: "card", "data-model": label });
      card.append(el("h3", {}, label, " ", el("span", { class: "muted now" })));
      const row = el("div", { class: "charts" });
      dashboard.charts[label] = {};
      for (const name of Object.keys(CHARTS)) {
        const box = el("div", { class: "chart", "data-chart": name });
        row.append(box);
      }
      card.append(row);
      const head = el("tr", {}, ...STAT_FIELDS.map(([, title]) => el("th", {}, title)));
      const cells = el("tr", {}, ...STAT_FIELDS.map(([field]) => el("td", { class: "num", "data-field": field })));
      card.append(el("table", { class: "stats" }, el("thead", {}, head), el("tbody", {}, cells)));
      root.append(card);
      for (const [name, [title, names]] of Object.entries(CHARTS)) {
        const box = card.querySelector(`[data-chart="${name}"]`);
        const width = Math.max(300, box.clientWidth || 360);
        const options = chartOptions(title, names, width, name === "instances");
        dashboard.charts[label][name] = new uPlot(options, [[], ...names.map(() => [])], box);
      }
    }
    const data = modelCharts(label, series);
    for (const [name, chart] of Object.entries(dashboard.charts[label])) chart.setData(data[name]);
    const summary = metrics.models[label] || {};
    for (const [field] of STAT_FIELDS) {
      card.querySelector(`[data-field="${field}"]`).textContent = fmt(summary[field] ?? (field === "requests" ? 0 : null));
    }
    const active = stats.active_instances[label] ?? 0;
    const desired = stats.desired_instances[label] ?? 0;
    const queued = stats.queues[label] ?? 0;
    card.querySelector(".now").textContent = `now: ${active} instance(s), desired ${desired}, ${queued} queued or running`;
    card.querySelector(".now").setAttribute("data-active", String(active));
  }
}

// -- workers, scaler, alerts --------------------------------------------------------------
function renderWorkers(workers, stats, health) {
  const body = document.querySelector("#workers tbody");
  body.replaceChildren();
  const roles = stats.workers;
  const names = new Set([...Object.keys(workers.workers), ...Object.keys(roles)]);
  if (!names.size) body.append(el("tr", {}, el("td", { colspan: "10", class: "muted" }, "no worker process runs")));
  for (const name of [...names].sort()) {
    const w = workers.workers[name] || {};
    const r = roles[name] || {};
    const role = r.starting ? "starting" : (r.serving && r.serving.length ? "serving" : (r.managed ? "warm standby" : "idle"));
    const models = (w.models || []).map((m) => `${m.name}/${m.version} (${mb(m.bytes)})`)
      .concat((w.loading || []).map((m) => `${m} (loading)`)).join(", ") || "–";
    const gpu = w.gpu && w.gpu.gpu !== null && w.gpu.gpu !== undefined
      ? `${mb(w.gpu.memory_used_bytes)} / ${mb(w.gpu.memory_total_bytes)}, ${fmt(w.gpu.utilization_percent)}%`
      : (w.gpu && w.gpu.reason ? "no GPU" : "–");
    const state = health.workers[name] || w.health || "–";
    body.append(el("tr", { "data-worker": name },
      el("td", {}, name), el("td", {}, w.host || "–"), el("td", {}, w.device || "–"), el("td", {}, role),
      el("td", {}, models), el("td", {}, gpu), el("td", { class: "num" }, fmt(w.cpu_percent)),
      el("td", { class: "num" }, mb(w.rss_bytes)), el("td", { class: "num" }, fmt(w.held)),
      el("td", { class: `health-${state}` }, state)));
  }
}

function renderScaler(stats, health, series) {
  const scaler = stats.scaler || {};
  const ticks = series.fleet.average_tick_ms.filter((v) => v !== null);
  const standby = Object.entries(stats.workers).filter(([, w]) => w.managed && !w.starting && !w.serving.length).map(([n]) => n);
  const rows = [
    ["state", health.scaler],
    ["leader", scaler.leader || "–"],
    ["last tick", scaler.time ? `${clock(scaler.time)} (${fmt(health.scaler_last_tick_age_s)} s ago)` : "–"],
    ["tick duration", scaler.tick_ms != null ? `${fmt(scaler.tick_ms, 2)} ms (window mean ${ticks.length ? fmt(ticks.reduce((a, b) => a + b, 0) / ticks.length, 2) : "–"} ms)` : "–"],
    ["registered versions", fmt(scaler.registered_versions)],
    ["warm standby", standby.join(", ") || "none"],
    ["Redis", health.redis],
  ];
  document.getElementById("scaler").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { "data-scaler": k }, v)]));
  const body = document.querySelector("#decisions tbody");
  body.replaceChildren(...stats.decisions.slice(0, 25).map((d) =>
    el("tr", {}, el("td", {}, clock(d.time)), el("td", {}, d.model === "*" ? "fleet" : `${d.model}/${d.version}`),
      el("td", {}, `${d.from} → ${d.to}`), el("td", {}, d.reason))));
}

function renderAlerts(alerts) {
  const active = Object.entries(alerts.active);
  document.getElementById("alerts-active").replaceChildren(...(active.length
    ? active.map(([key, a]) => el("li", { "data-alert": key }, `${key}: ${a.message || ""}`))
    : [el("li", { class: "muted" }, "none")]));
  document.querySelector("#alerts-history tbody").replaceChildren(...alerts.history.slice(0, 20).map((e) =>
    el("tr", {}, el("td", {}, clock(e.time)), el("td", {}, e.state || ""),
      el("td", {}, e.alert || ""), el("td", {}, e.message || ""))));
}

// -- controls -----------------------------------------------------------------------------
function renderVersions(models) {
  const select = document.getElementById("ctl-version");
  const wanted = Object.entries(models.models).flatMap(([name, m]) => Object.keys(m.versions).map((v) => `${name}/${v}`));
  if (select.options.length === wanted.length && [...select.options].every((o, i) => o.value === wanted[i])) return;
  const chosen = select.value;
  select.replaceChildren(...wanted.map((label) => el("option", { value: label }, label)));
  if (wanted.includes(chosen)) select.value = chosen;
}

function chosen() {
  const [model, version] = document.getElementById("ctl-version").value.split("/");
  return { model: encodeURIComponent(model), version: encodeURIComponent(version) };
}

async function control(action) {
  const { model, version } = chosen();
  const result = document.getElementById("ctl-result");
  let call;
  if (action === "scale") {
    const n = document.getElementById("ctl-instances").value;
    call = manage("POST", `/autoscaler/scale?model_name=${model}&version=${version}&target_instances=${encodeURIComponent(n)}`);
  } else if (action === "release") {
    call = manage("DELETE", `/autoscaler/scale?model_name=${model}&version=${version}`);
  } else if (action === "load") {
    call = manage("POST", `/autoscaler/load?model_name=${model}&version=${version}`);
  } else if (action === "unload") {
    call = manage("DELETE", `/autoscaler/unload?model_name=${model}&version=${version}`);
  } else if (action === "traffic") {
    const weights = {};
    for (const part of document.getElementById("ctl-split").value.split(",")) {
      const [v, w] = part.split("=").map((s) => s.trim());
      if (v) weights[v] = Number(w);
    }
    call = manage("POST", `/autoscaler/traffic?model_name=${model}`, { weights });
  } else {
    call = manage("DELETE", `/autoscaler/traffic?model_name=${model}`);
  }
  const { ok, status, detail } = await call;
  result.textContent = `${action}: ${ok ? "done" : "refused"} (${status}) ${detail}`;
  result.setAttribute("data-status", String(status));
  poll();
}

for (const action of ["scale", "release", "load", "unload", "traffic", "traffic-reset"]) {
  document.getElementById(`ctl-${action}`).addEventListener("click", () => control(action));
}
document.getElementById("window").addEventListener("change", () => poll());

// -- polling ------------------------------------------------------------------------------
let polling = false;
async function poll() {
  if (polling) return;
  polling = true;
  const windowS = Number(document.getElementById("window").value);
  const status = document.getElementById("status");
  try {
    const [stats, health, workers, metrics, series, alerts, models] = await Promise.all([
      getJSON("/autoscaler/stats"),
      getJSON("/autoscaler/health"),
      getJSON("/autoscaler/workers"),
      getJSON(`/autoscaler/metrics?window_seconds=${windowS}`),
      getJSON(`/autoscaler/metrics/series?window_seconds=${windowS}&step_seconds=${STEP_OF_WINDOW[windowS]}`),
      getJSON("/autoscaler/alerts"),
      getJSON("/models"),
    ]);
    Object.assign(dashboard, { stats, health, workers, metrics, series, alerts });
    renderVersions(models);
    renderModels(series, metrics, stats);
    renderWorkers(workers, stats, health);
    renderScaler(stats, health, series);
    renderAlerts(alerts);
    status.textContent = health.healthy ? "healthy" : `unhealthy: Redis ${health.redis}, scaler ${health.scaler}`;
    status.className = "status " + (health.healthy ? "ok" : "bad");
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    dashboard.polls += 1;
  } catch (error) {
    status.textContent = `API unreachable: ${error.message}`;
    status.className = "status bad";
  } finally {
    polling = false;
  }
}

poll();
setInterval(poll, POLL_MS);
