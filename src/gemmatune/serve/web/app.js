// The run page of `gemmatune serve`: runs and progress (/api/runs), loss curves drawn here as SVG from every
// metrics.jsonl row (polled incrementally with ?since=N), the eval table, and a chat box on /v1/chat/completions.
"use strict";

const EMA = 0.9;
// chart: { data: [steps, train, eval, smoothed], smooth } of the curves on screen, null before the first draw;
// hoverStep: the step under the pointer, kept across redraws (new rows, resizes), null when the pointer is away.
const state = { run: null, rows: [], next: 0, chart: null, hoverStep: null, hasEval: null, history: [] };
window.gemmatune = state; // read by the browser test

const $ = (id) => document.getElementById(id);

function headers(extra) {
  const key = localStorage.getItem("gemmatune-api-key");
  return Object.assign(key ? { Authorization: `Bearer ${key}` } : {}, extra || {});
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({}, options, { headers: headers((options || {}).headers) }));
  if (response.status === 401) {
    $("key-box").hidden = false;
    throw new Error("this server needs an API key: enter it at the top right");
  }
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error((body.error && body.error.message) || `${path}: HTTP ${response.status}`);
  }
  return response;
}

// Polled reads: a failed poll is retried by the next one, so it yields null instead of an error.
async function getJsonOrNull(path) {
  try {
    return await (await api(path)).json();
  } catch (err) {
    return null;
  }
}

function duration(seconds) {
  if (seconds == null) return "?";
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
}

function progressText(run) {
  if (run.state === "error") return `cannot be read: ${run.error}`; // one bad run folder, marked; the rest list
  const parts = [`${run.state}`, `step ${run.step} / ${run.total ?? "?"}`];
  if (run.tokens_per_second != null) parts.push(`${Math.round(run.tokens_per_second)} tokens/s`);
  if (run.state === "training") parts.push(`ETA ${duration(run.eta_seconds)}`);
  // A budgeted run plans its steps to end on time: its budget and what is left of it.
  if (run.time_budget_seconds != null) {
    const left = run.budget_left_seconds != null ? `, ${duration(run.budget_left_seconds)} left` : "";
    parts.push(`budget ${duration(Math.round(run.time_budget_seconds))}${left}`);
  }
  if (run.state !== "training" && run.stop_reason) parts.push(`stop: ${run.stop_reason.replace("_", " ")}`);
  return parts.join(" · ");
}

async function refreshRuns() {
  const body = await getJsonOrNull("/api/runs");
  if (body === null) return;
  $("runs-dir").textContent = body.runs_dir;
  $("no-runs").hidden = body.runs.length > 0;
  const list = $("runs");
  list.replaceChildren(...body.runs.map((run) => {
    const li = document.createElement("li");
    li.dataset.name = run.name;
    li.className = run.name === state.run ? "selected" : "";
    const name = document.createElement("strong");
    name.textContent = run.name;
    const info = document.createElement("small");
    info.className = `state-${run.state}`;
    info.textContent = progressText(run);
    li.append(name, info);
    li.onclick = () => selectRun(run.name);
    return li;
  }));
  const current = body.runs.find((r) => r.name === state.run);
  if (!state.run && body.runs.length) selectRun(body.runs[0].name);
  if (current) {
    $("progress").textContent = progressText(current);
    if (current.has_eval !== state.hasEval) {
      state.hasEval = current.has_eval;
      if (current.has_eval) loadEval();
    }
  }
}

function selectRun(name) {
  state.run = name;
  state.rows = [];
  state.next = 0;
  state.hasEval = null;
  $("run").hidden = false;
  $("run-name").textContent = name;
  $("eval").innerHTML = '<p class="muted">No eval.json yet: run <code>gemmatune eval --adapter RUN</code>.</p>';
  for (const li of $("runs").children) li.className = li.dataset.name === name ? "selected" : "";
  state.chart = null;
  state.hoverStep = null;
  $("chart").replaceChildren();
  pollMetrics();
  refreshRuns();
}

async function pollMetrics() {
  const name = state.run;
  if (!name) return;
  const body = await getJsonOrNull(`/api/runs/${encodeURIComponent(name)}/metrics?since=${state.next}`);
  if (body === null) return;
  if (name !== state.run) return;
  state.next = body.next;
  if (body.rows.length || !state.chart) {
    state.rows.push(...body.rows);
    draw();
  }
}

function smoothed(values) {
  // Exponential moving average with TensorBoard's debiasing, so the first points are not pulled to zero.
  let avg = 0, weight = 0;
  return values.map((v) => {
    if (v == null) return null;
    avg = EMA * avg + (1 - EMA) * v;
    weight = EMA * weight + (1 - EMA);
    return avg / weight;
  });
}

function chartFigure() {
  // What the train curve shows: a GRPO run's mean reward (its loss, with one update per generation, stays near 0),
  // otherwise the loss.
  return state.rows.some((row) => row.reward != null) ? "reward" : "loss";
}

function seriesData(figure) {
  // One x per step; train and eval values logged at the same step share it (the hover reads one step's values).
  const byStep = new Map();
  for (const row of state.rows) {
    if (row[figure] == null && row.eval_loss == null) continue;
    const at = byStep.get(row.step) || { train: null, eval: null };
    if (row[figure] != null) at.train = row[figure];
    if (row.eval_loss != null) at.eval = row.eval_loss;
    byStep.set(row.step, at);
  }
  const steps = [...byStep.keys()].sort((a, b) => a - b);
  const train = steps.map((s) => byStep.get(s).train);
  const evals = steps.map((s) => byStep.get(s).eval);
  // The smoothed curve is a series of its own, drawn over the raw points, which stay visible.
  return [steps, train, evals, smoothed(train)];
}

function draw() {
  const figure = chartFigure();
  const data = seriesData(figure);
  const trainPoints = data[1].filter((v) => v != null).length;
  const evalPoints = data[2].filter((v) => v != null).length;
  $("point-count").textContent = `${trainPoints} train points, ${evalPoints} eval points`;
  $("chart").dataset.trainPoints = trainPoints;
  $("chart").dataset.evalPoints = evalPoints;
  state.chart = { data, figure, smooth: $("smooth").checked };
  drawChart(state.chart);
}

// --- the loss chart: SVG, redrawn whole on every change (a few thousand points at most).

const SVG_NS = "http://www.w3.org/2000/svg";
const CHART_HEIGHT = 320;
const MARGIN = { left: 56, right: 16, top: 12, bottom: 40 };
function chartSeries(figure) { // [index in data, label, CSS class]
  return [[1, `train ${figure}`, "train"], [2, "eval loss", "eval"], [3, `train ${figure}, EMA ${EMA}`, "smooth"]];
}

function svg(tag, attrs, parent) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, value);
  if (parent) parent.append(el);
  return el;
}

function ticks(lo, hi, count) {
  // Round values (1, 2 or 5 times a power of ten) from lo to hi, about `count` of them.
  const raw = (hi - lo) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  const found = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) found.push(Number(v.toPrecision(12)));
  return found;
}

function format(value) {
  return value == null ? "–" : Math.abs(value) >= 100 ? value.toFixed(0) : value.toPrecision(4);
}

function drawChart(chart) {
  const box = $("chart");
  const [steps, ...series] = chart.data;
  const all = chartSeries(chart.figure);
  const shown = all.filter(([i]) => i !== 3 || chart.smooth);
  const width = Math.max(320, box.clientWidth || 640);
  const plotWidth = width - MARGIN.left - MARGIN.right, plotHeight = CHART_HEIGHT - MARGIN.top - MARGIN.bottom;
  const values = shown.flatMap(([i]) => series[i - 1]).filter((v) => v != null);
  let [x0, x1] = steps.length ? [steps[0], steps.at(-1)] : [0, 1];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  let [y0, y1] = values.length ? [Math.min(...values), Math.max(...values)] : [0, 1];
  const pad = (y1 - y0) * 0.05 || 0.5; // a flat curve still gets a visible band
  y0 -= pad; y1 += pad;
  const x = (step) => MARGIN.left + ((step - x0) / (x1 - x0)) * plotWidth;
  const y = (v) => MARGIN.top + (1 - (v - y0) / (y1 - y0)) * plotHeight;

  const root = svg("svg", { width, height: CHART_HEIGHT, role: "img", "aria-label": `${chart.figure} by step` });
  const axes = svg("g", { class: "axes" }, root);
  for (const v of ticks(y0, y1, 6)) {
    svg("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: y(v), y2: y(v), class: "grid" }, axes);
    svg("text", { x: MARGIN.left - 6, y: y(v), class: "tick y" }, axes).textContent = String(v);
  }
  for (const v of ticks(x0, x1, Math.max(2, Math.floor(plotWidth / 80))).filter(Number.isInteger)) {
    svg("line", { x1: x(v), x2: x(v), y1: MARGIN.top, y2: MARGIN.top + plotHeight, class: "grid" }, axes);
    svg("text", { x: x(v), y: MARGIN.top + plotHeight + 16, class: "tick x" }, axes).textContent = v;
  }
  svg("rect", { x: MARGIN.left, y: MARGIN.top, width: plotWidth, height: plotHeight, class: "frame" }, axes);
  svg("text", { x: MARGIN.left + plotWidth / 2, y: CHART_HEIGHT - 4, class: "label" }, axes).textContent = "step";
  svg("text", { x: 14, y: MARGIN.top + plotHeight / 2, class: "label y",
    transform: `rotate(-90 14 ${MARGIN.top + plotHeight / 2})` }, axes).textContent = chart.figure;

  for (const [i, , name] of shown) {
    // One vertex per logged value; a missing value (a step with only the other loss) is skipped, not a gap.
    const points = steps.map((step, k) => [step, series[i - 1][k]]).filter(([, v]) => v != null);
    if (!points.length) continue;
    const d = points.map(([step, v], k) => `${k ? "L" : "M"}${x(step).toFixed(1)},${y(v).toFixed(1)}`).join("");
    svg("path", { d, class: `line ${name}` }, root);
    if (name !== "eval") continue;
    for (const [step, v] of points) svg("circle", { cx: x(step), cy: y(v), r: 3.5, class: "eval" }, root);
  }

  // Hover: the step under the pointer, marked, and its values in the legend.
  const cursor = svg("line", { y1: MARGIN.top, y2: MARGIN.top + plotHeight, class: "cursor", visibility: "hidden" },
    root);
  const legend = document.createElement("div");
  legend.id = "chart-legend";
  const hover = document.createElement("span");
  hover.id = "chart-hover";
  legend.append(hover, ...shown.map(([i, label, name]) => {
    const item = document.createElement("span");
    item.className = `key ${name}`;
    item.dataset.series = i;
    item.textContent = label;
    return item;
  }));
  const overlay = svg("rect", { x: MARGIN.left, y: MARGIN.top, width: plotWidth, height: plotHeight,
    class: "overlay" }, root);
  const label = (item) => all.find(([i]) => i === Number(item.dataset.series))[1];
  const showStep = (k) => {
    cursor.setAttribute("x1", x(steps[k]));
    cursor.setAttribute("x2", x(steps[k]));
    cursor.setAttribute("visibility", "visible");
    hover.textContent = `step ${steps[k]}`;
    for (const item of legend.querySelectorAll(".key")) {
      item.textContent = `${label(item)} ${format(series[item.dataset.series - 1][k])}`;
    }
  };
  overlay.onmousemove = (event) => {
    if (!steps.length) return;
    const at = x0 + ((event.clientX - root.getBoundingClientRect().left - MARGIN.left) / plotWidth) * (x1 - x0);
    let k = 0;
    for (let j = 1; j < steps.length; j++) if (Math.abs(steps[j] - at) < Math.abs(steps[k] - at)) k = j;
    state.hoverStep = steps[k];
    showStep(k);
  };
  overlay.onmouseleave = () => {
    state.hoverStep = null;
    cursor.setAttribute("visibility", "hidden");
    hover.textContent = "";
    for (const item of legend.querySelectorAll(".key")) item.textContent = label(item);
  };
  if (steps.includes(state.hoverStep)) showStep(steps.indexOf(state.hoverStep));
  box.replaceChildren(root, legend);
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function evalMetrics(report) {
  // [label, key or function of a variant, digits] per table row, by the report's kind: a preference run's scores
  // pairs (accuracy and margin), a GRPO run's the rewards of its answers, a supervised run's loss and matches.
  const stops = [["stopped at EOS/end-of-turn %", "stopped", 1], ["mean new tokens", "mean_new_tokens", 1]];
  if (report.kind === "preference") {
    return [["preference accuracy %", "accuracy", 1], ["mean margin (nats)", "mean_margin", 3],
      ["log p(chosen)", "chosen_log_prob", 3], ["log p(rejected)", "rejected_log_prob", 3], ...stops];
  }
  if (report.kind === "grpo") {
    const names = Object.keys(report.variants[0]?.per_function || {});
    return [["mean reward", "mean_reward", 3], ...names.map((n) => [`reward: ${n}`, (v) => v.per_function[n], 3]),
      ...stops];
  }
  return [["response loss", "response_loss", 4], ["perplexity", "perplexity", 2], ["exact match %", "exact_match", 1],
    ["ROUGE-L F1 %", "rouge_l", 1], ...stops];
}

async function loadEval() {
  const name = state.run;
  const report = await getJsonOrNull(`/api/runs/${encodeURIComponent(name)}/eval`);
  if (report === null) return;
  if (name !== state.run) return;
  const metrics = evalMetrics(report).map(([label, key, digits]) =>
    [label, typeof key === "function" ? key : (v) => v[key], digits]);
  const table = document.createElement("table");
  table.id = "eval-table";
  const head = table.insertRow();
  head.append(cell("metric"), ...report.variants.map((v) => cell(v.name)));
  for (const [label, key, digits] of metrics) {
    const row = table.insertRow();
    row.append(cell(label), ...report.variants.map((v) => cell(Number(key(v)).toFixed(digits), "num")));
  }
  const note = document.createElement("p");
  note.className = "muted";
  note.textContent = `${report.rows} rows of ${report.file}, greedy, at most ${report.max_new_tokens} new tokens` +
    (report.template ? `, template ${report.template}.` : ".");
  const parts = [table, note];
  report.samples.forEach((sample, i) => {
    const h = document.createElement("h4");
    h.textContent = `Sample ${i + 1}`;
    const t = document.createElement("table");
    t.className = "sample";
    for (const [k, v] of Object.entries(sample)) {
      const row = t.insertRow();
      row.append(cell(k), cell(v));
    }
    parts.push(h, t);
  });
  $("eval").replaceChildren(...parts);
}

async function loadModels() {
  const body = await getJsonOrNull("/v1/models");
  if (body === null) return;
  const select = $("model");
  select.replaceChildren(...body.data.map((m) => {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.parent ? m.id : `${m.id} (${m.root})`;
    return option;
  }));
  if (body.data.length > 1) select.value = body.data[1].id; // the first adapter
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("messages").append(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text) return;
  $("prompt").value = "";
  addMessage("user", text);
  state.history.push({ role: "user", content: text });
  const reply = addMessage("assistant", "");
  $("send").disabled = true;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        model: $("model").value, messages: state.history, stream: true,
        max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value),
      }),
    });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "", answer = "", finish = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, end).trim();
        buffer = buffer.slice(end + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices[0];
        if (!choice) continue;
        answer += choice.delta.content || "";
        finish = choice.finish_reason || finish;
        reply.textContent = answer;
      }
    }
    reply.dataset.finish = finish;
    reply.dataset.done = "1";
    state.history.push({ role: "assistant", content: answer });
  } catch (err) {
    reply.className = "msg error";
    reply.textContent = String(err.message || err);
    reply.dataset.done = "1";
    state.history.pop();
  } finally {
    $("send").disabled = false;
  }
}

$("api-key").value = localStorage.getItem("gemmatune-api-key") || "";
$("api-key").onchange = () => {
  localStorage.setItem("gemmatune-api-key", $("api-key").value);
  refreshRuns();
  loadModels();
};
$("smooth").onchange = draw;
window.onresize = () => { if (state.chart) drawChart(state.chart); };
$("ema-weight").textContent = EMA;
$("chat-form").onsubmit = send;
$("reset").onclick = () => { state.history = []; $("messages").replaceChildren(); };
$("prompt").onkeydown = (e) => { if (e.key === "Enter" && !e.shiftKey) send(e); };

refreshRuns();
loadModels();
setInterval(pollMetrics, 1000);
setInterval(refreshRuns, 3000);
