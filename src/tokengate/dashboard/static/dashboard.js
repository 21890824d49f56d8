// tokengate dashboard: reads /api/events (server-sent events), draws the views, posts controls.
// Plain browser JavaScript, no build step and nothing fetched from elsewhere.
"use strict";

const HISTORY = 120;  // points kept for the charts (one per snapshot)
const history = [];   // {t, submitted, resolved, failed, discarded, p50, p95, p99}
let lastSnapshot = null;
let lookedUp = null;  // the id shown in the look-up box

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
}

function secs(value) {
  if (value === null || value === undefined) return "–";
  if (value >= 1) return value.toFixed(2) + " s";
  if (value >= 0.001) return (value * 1000).toFixed(1) + " ms";
  return (value * 1e6).toFixed(0) + " µs";
}

function bytes(value) {
  if (value === null || value === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (value >= 1024 && i < units.length - 1) { value /= 1024; i++; }
  return value.toFixed(i ? 1 : 0) + " " + units[i];
}

function setHTML(el, html) {
  if (el && el.dataset.html !== html) { el.innerHTML = html; el.dataset.html = html; }
}

function notice(text, isError) {
  const el = document.getElementById("notice");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

// -- views -------------------------------------------------------------------------------------
function renderTotals(s) {
  const st = s.stats;
  const cards = [
    ["submitted", st.submitted], ["resolved", st.resolved], ["failed", st.failed],
    ["discarded", st.discarded], ["in flight", st.in_flight], ["retried", st.retried],
    ["p50", secs(st.latency_p50)], ["p95", secs(st.latency_p95)], ["p99", secs(st.latency_p99)],
  ];
  setHTML(document.getElementById("totals"), cards.map(([k, v]) =>
    `<div class="card" data-key="${esc(k)}"><div class="v" id="total-${esc(k.replace(" ", "-"))}">${esc(v)}</div><div class="k">${esc(k)}</div></div>`).join(""));
  const status = document.getElementById("status");
  status.textContent = s.running ? "live" : "stopped";
  status.className = "badge " + (s.running ? "live" : "down");
  const adm = document.getElementById("admission");
  const paused = Object.entries(s.admission.paused);
  adm.textContent = paused.length ? "admission paused: " + paused.map(([k, v]) => `${k} (${v})`).join("; ")
    : `admission open, ${s.admission.waiters} waiting`;
  adm.className = "badge" + (paused.length ? " paused" : "");
  adm.dataset.paused = paused.length ? "yes" : "no";
  const link = document.getElementById("backend-dashboard");
  if (s.backend_dashboard && /^https?:\/\//.test(s.backend_dashboard)) {
    link.href = s.backend_dashboard; link.rel = "noopener noreferrer"; link.target = "_blank";
    link.textContent = `${s.backend} dashboard`; link.hidden = false;
  }
}

function drawChart(canvasId, legendId, series) {
  const canvas = document.getElementById(canvasId);
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  let max = 0;
  for (const s of series) for (const v of s.values) max = Math.max(max, v);
  max = max || 1;
  ctx.strokeStyle = "#263241";
  ctx.beginPath(); ctx.moveTo(0, h - 1); ctx.lineTo(w, h - 1); ctx.stroke();
  for (const s of series) {
    ctx.strokeStyle = s.color; ctx.lineWidth = 1.5; ctx.beginPath();
    s.values.forEach((v, i) => {
      const x = (i / Math.max(1, HISTORY - 1)) * w;
      const y = h - 2 - (v / max) * (h - 6);
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
  }
  ctx.fillStyle = "#8a96a3"; ctx.font = "11px sans-serif";
  ctx.fillText(max.toPrecision(3), 4, 12);
  setHTML(document.getElementById(legendId), series.map((s) =>
    `<span style="color:${s.color}">■ ${esc(s.name)} ${esc(s.last)}</span>`).join(""));
}

function renderCharts() {
  const rate = (key) => history.slice(1).map((p, i) => {
    const q = history[i];
    const dt = p.t - q.t;
    return dt > 0 ? Math.max(0, (p[key] - q[key]) / dt) : 0;
  });
  const last = (values) => values.length ? values[values.length - 1].toFixed(1) : "0";
  const rates = [["submitted", "#58a6ff"], ["resolved", "#3fb950"], ["failed", "#f85149"],
    ["discarded", "#d29922"]].map(([k, color]) => {
    const values = rate(k);
    return { name: k, color, values, last: last(values) };
  });
  drawChart("rates-chart", "rates-legend", rates);
  const lat = [["p50", "#3fb950"], ["p95", "#d29922"], ["p99", "#f85149"]].map(([k, color]) => {
    const values = history.map((p) => p[k]);
    return { name: k, color, values, last: values.length ? secs(values[values.length - 1]) : "–" };
  });
  drawChart("latency-chart", "latency-legend", lat);
}

function renderWorkers(s) {
  // One row per lane and core: how many workers, how many busy, what waits in their mailboxes.
  const groups = new Map();
  for (const w of s.workers) {
    const key = `${w.lane}/${w.core ?? "–"}`;
    if (!groups.has(key)) groups.set(key, { lane: w.lane, core: w.core, workers: 0, busy: 0, queued: 0, tokens: [] });
    const g = groups.get(key);
    g.workers += 1; g.queued += w.queued;
    if (w.busy) { g.busy += 1; if (w.token) g.tokens.push(w.token); }
  }
  const rows = [...groups.values()].sort((a, b) => (a.core ?? 0) - (b.core ?? 0) || a.lane.localeCompare(b.lane));
  setHTML(document.querySelector("#workers tbody"), rows.map((g) =>
    `<tr data-lane="${esc(g.lane)}" data-core="${esc(g.core)}"><td>${esc(g.lane)}</td><td>${esc(g.core)}</td>` +
    `<td>${esc(g.workers)}</td><td>${esc(g.queued)}</td><td>${esc(g.busy)}</td>` +
    `<td>${g.tokens.slice(0, 3).map(esc).join("<br>")}${g.tokens.length > 3 ? ` +${g.tokens.length - 3}` : ""}</td></tr>`).join(""));
  const procs = s.workers.filter((w) => w.lane === "process");
  setHTML(document.querySelector("#processes tbody"), procs.length ? procs.map((w) =>
    `<tr data-worker="${esc(w.name)}"><td>${esc(w.name)}</td><td>${esc(w.core)}</td><td>${esc(w.pid ?? "–")}</td>` +
    `<td class="state">${esc(w.state)}</td><td class="restarts">${esc(w.restarts)}</td><td>${esc(w.last_crash ?? "")}</td>` +
    `<td>${w.token ? `${esc(w.token)} <button data-action="kill" data-token="${esc(w.token)}">kill</button>` : ""}</td></tr>`).join("")
    : `<tr><td colspan="7">no process lane</td></tr>`);
}

function renderTiers(s) {
  setHTML(document.querySelector("#tiers tbody"), s.tiers.map((t) =>
    `<tr data-tier="${esc(t.tier)}"><td>${esc(t.tier)}</td><td class="limit">${esc(t.limit)}</td><td>${esc(t.running)}</td>` +
    `<td>${esc(t.waiting)}</td><td>${esc(t.high_water)}</td>` +
    `<td><input class="tier-limit" data-tier="${esc(t.tier)}" size="4" placeholder="${esc(t.limit)}">` +
    `<button data-action="set_storage_limit" data-tier="${esc(t.tier)}">set</button></td></tr>`).join(""));
}

function renderOverflow(s) {
  const o = s.overflow;
  if (!o.enabled) { setHTML(document.getElementById("overflow"), "off (overflow_guard=False)"); return; }
  const share = o.rss !== null && o.budget ? Math.min(100, (100 * o.rss) / o.budget) : 0;
  setHTML(document.getElementById("overflow"),
    `<div>RSS ${bytes(o.rss)} of ${bytes(o.budget)} budget (resumes below ${bytes(o.resume_below)})</div>` +
    `<div class="bar"><div style="width:${share.toFixed(1)}%"></div></div>` +
    `<div>${o.paused ? "admission paused" : "admitting"} · ${esc(o.pauses)} pauses so far</div>`);
}

function renderGuardHouse(s) {
  const g = s.guard_house;
  const ops = g.operations.slice().sort((a, b) => a.operation_type.localeCompare(b.operation_type));
  setHTML(document.querySelector("#guard-house tbody"), ops.length ? ops.map((o) => {
    const op = esc(o.operation_type);
    const paused = s.paused_operations && s.paused_operations[o.operation_type];
    const b = (action, label) => `<button data-action="${action}" data-operation="${op}">${label}</button>`;
    return `<tr data-operation="${op}"><td>${op}</td><td>${esc(o.runs)}</td><td>${esc(o.errors)}</td>` +
      `<td class="${esc(o.health)}">${esc(o.health)}</td><td>${secs(o.p95)}</td><td>${esc(o.slow_runs)}</td>` +
      `<td class="breaker ${esc(o.breaker)}">${esc(o.breaker)}${o.blocked_calls ? ` (${esc(o.blocked_calls)} blocked)` : ""}</td>` +
      `<td><span class="op-state">${paused ? esc(paused) : ""}</span> ` +
      b("pause_operation", "pause") + b("resume_operation", "resume") + b("drain_operation", "drain") +
      b("cancel_queued", "cancel queued") + b("open_breaker", "open breaker") + b("close_breaker", "close breaker") +
      `</td></tr>`;
  }).join("") : `<tr><td colspan="8">no runs yet</td></tr>`);
  const tb = Object.fromEntries(s.tracebacks.map((t) => [t.token_id, t.traceback]));
  setHTML(document.getElementById("failures"), g.failures.length ? g.failures.slice().reverse().map((f) =>
    `<details class="failure"><summary>${esc(new Date(f.at * 1000).toLocaleTimeString())} ` +
    `<b>${esc(f.token_id)}</b> ${esc(f.exception_type)}: ${esc(f.message)} (attempt ${esc(f.attempt)}, ${esc(f.outcome)})</summary>` +
    `<pre>${esc(tb[f.token_id] ?? "traceback not kept (it happened before the page opened)")}</pre></details>`).join("")
    : "none");
}

function renderQuarantine(s) {
  setHTML(document.querySelector("#quarantine tbody"), s.quarantine.length ? s.quarantine.map((q) =>
    `<tr data-token="${esc(q.token_id)}"><td>${esc(q.token_id)}</td><td>${esc(q.operation_type)}</td><td>${esc(q.reason)}</td>` +
    `<td><button data-action="release" data-token="${esc(q.token_id)}">release</button>` +
    `<button data-action="reject" data-token="${esc(q.token_id)}">reject</button></td></tr>`).join("")
    : `<tr><td colspan="4">nothing held</td></tr>`);
}

function renderConvergence(s) {
  const c = s.convergence;
  if (!c) { setHTML(document.getElementById("convergence"), "off"); return; }
  const pools = Object.entries(c.pools).map(([k, p]) =>
    `<tr><td>${esc(k)}</td><td>${esc(p.baseline)}</td><td>${esc(p.current)}</td><td>${esc(p.peak)}</td></tr>`).join("");
  const swaps = c.swaps.slice().reverse().map((w) =>
    `<li>${esc(w.label)}: ${esc(w.action)} ${esc(w.before)} → ${esc(w.after)} (${esc(w.reason)})</li>`).join("");
  setHTML(document.getElementById("convergence"),
    `<table><thead><tr><th>pool</th><th>baseline</th><th>now</th><th>peak</th></tr></thead><tbody>${pools}</tbody></table>` +
    `<ul>${swaps || "<li>no swaps yet</li>"}</ul>`);
}

function renderStream(s) {
  const canvas = document.getElementById("stream");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  const spans = s.stream;
  const workers = [...new Set(spans.map((x) => x.worker))].sort();
  // The time axis spans the runs shown (at least 0.5 s), newest at the right.
  const windowS = Math.max(0.5, ...spans.map((x) => x.start));
  const rowH = Math.max(3, Math.min(18, (h - 14) / Math.max(1, workers.length)));
  const colors = {};
  const palette = ["#58a6ff", "#3fb950", "#d2a8ff", "#ffa657", "#79c0ff", "#56d364", "#e3b341"];
  ctx.font = "10px sans-serif";
  if (rowH >= 10) {
    workers.forEach((name, i) => { ctx.fillStyle = "#8a96a3"; ctx.fillText(name, 2, 8 + i * rowH + rowH / 2); });
  }
  ctx.fillStyle = "#8a96a3";
  // Under load the server records the first runs of each short period (failures and discards
  // always): say so, rather than let the gaps look like idle workers.
  const sampled = s.stream_sampled ? ` (the first ${s.stream_sampled.runs} of every ${s.stream_sampled.every_s} s recorded)` : "";
  ctx.fillText(`last ${windowS.toFixed(2)} s · ${spans.length} runs${sampled} · ${workers.length} workers`, 2, h - 2);
  const left = 130;
  for (const x of spans) {
    if (!(x.operation_type in colors)) colors[x.operation_type] = palette[Object.keys(colors).length % palette.length];
    const x0 = left + (1 - Math.min(windowS, x.start) / windowS) * (w - left);
    const x1 = left + (1 - Math.min(windowS, Math.max(0, x.end)) / windowS) * (w - left);
    ctx.fillStyle = x.state === "failed" ? "#f85149" : x.state === "discarded" ? "#d29922" : colors[x.operation_type];
    ctx.fillRect(x0, 4 + workers.indexOf(x.worker) * rowH, Math.max(1, x1 - x0), rowH - 2);
  }
  canvas.dataset.spans = String(spans.length);
  canvas.dataset.sampled = s.stream_sampled ? "yes" : "no";
}

function render(s) {
  lastSnapshot = s;
  const st = s.stats;
  history.push({ t: s.time, submitted: st.submitted, resolved: st.resolved, failed: st.failed,
    discarded: st.discarded, p50: st.latency_p50, p95: st.latency_p95, p99: st.latency_p99 });
  if (history.length > HISTORY) history.shift();
  renderTotals(s); renderCharts(); renderWorkers(s); renderTiers(s); renderOverflow(s);
  renderGuardHouse(s); renderQuarantine(s); renderConvergence(s); renderStream(s);
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

// -- token look-up -------------------------------------------------------------------------------
async function lookUp(id) {
  lookedUp = id;
  const out = document.getElementById("lookup-result");
  const response = await fetch("/api/token/" + encodeURIComponent(id), { credentials: "same-origin" });
  const data = await response.json();
  out.textContent = response.ok ? Object.entries(data).map(([k, v]) => `${k}: ${v ?? "–"}`).join("\n") : data.error;
  out.dataset.state = response.ok ? data.state : "missing";
  const kill = document.getElementById("kill");
  kill.disabled = !response.ok;
  kill.dataset.token = id;
}

// -- controls --------------------------------------------------------------------------------------
async function control(body) {
  const response = await fetch("/api/control", {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (response.ok) notice(data.message, false); else notice(data.error, true);
  if (lookedUp) lookUp(lookedUp);
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const body = { action: button.dataset.action };
  if (button.dataset.operation) body.operation = button.dataset.operation;
  if (button.dataset.token) body.token = button.dataset.token;
  if (button.dataset.tier) {
    body.tier = button.dataset.tier;
    const input = document.querySelector(`input.tier-limit[data-tier="${button.dataset.tier}"]`);
    body.limit = Number(input && input.value);
  }
  control(body);
});

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("lookup-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = document.getElementById("lookup-id").value.trim();
    if (id) lookUp(id);
  });
  const source = new EventSource("/api/events");
  source.onmessage = (event) => {
    const data = JSON.parse(event.data);
    if (!data.hello) render(data);
  };
  source.onerror = () => {
    const status = document.getElementById("status");
    status.textContent = "disconnected"; status.className = "badge down";
  };
});
