// The run page of `gemmatune serve`: runs and progress (/api/runs), loss curves drawn with uPlot from every
// metrics.jsonl row (polled incrementally with ?since=N), the eval table, and a chat box on /v1/chat/completions.
"use strict";

const EMA = 0.9;
const state = { run: null, rows: [], next: 0, plot: null, hasEval: null, history: [] };
window.gemmatune = state; // read by the browser test: state.plot is the uPlot instance

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
  if (state.plot) { state.plot.destroy(); state.plot = null; }
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
  if (body.rows.length || !state.plot) {
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

function seriesData() {
  // One x per step; train and eval losses logged at the same step share it (uPlot wants aligned x values).
  const byStep = new Map();
  for (const row of state.rows) {
    if (row.loss == null && row.eval_loss == null) continue;
    const at = byStep.get(row.step) || { train: null, eval: null };
    if (row.loss != null) at.train = row.loss;
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
  const data = seriesData();
  const trainPoints = data[1].filter((v) => v != null).length;
  const evalPoints = data[2].filter((v) => v != null).length;
  $("point-count").textContent = `${trainPoints} train points, ${evalPoints} eval points`;
  $("chart").dataset.trainPoints = trainPoints;
  $("chart").dataset.evalPoints = evalPoints;
  if (state.plot) {
    state.plot.setData(data);
    state.plot.setSeries(3, { show: $("smooth").checked });
    return;
  }
  const width = Math.max(320, $("chart").clientWidth || 640);
  state.plot = new uPlot({
    width, height: 320,
    scales: { x: { time: false } },
    axes: [{ label: "step" }, { label: "loss" }],
    series: [
      { label: "step" },
      { label: "train loss", stroke: "#64b5f6", width: 1.5, spanGaps: true, points: { show: false } },
      { label: "eval loss", stroke: "#e53935", width: 2, spanGaps: true, points: { show: true, size: 6 } },
      { label: `train loss, EMA ${EMA}`, stroke: "#0d47a1", width: 2, spanGaps: true, points: { show: false },
        show: $("smooth").checked },
    ],
  }, data, $("chart"));
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

async function loadEval() {
  const name = state.run;
  const report = await getJsonOrNull(`/api/runs/${encodeURIComponent(name)}/eval`);
  if (report === null) return;
  if (name !== state.run) return;
  const metrics = [["response loss", "response_loss", 4], ["perplexity", "perplexity", 2],
    ["exact match %", "exact_match", 1], ["ROUGE-L F1 %", "rouge_l", 1],
    ["stopped at EOS/end-of-turn %", "stopped", 1], ["mean new tokens", "mean_new_tokens", 1]];
  const table = document.createElement("table");
  table.id = "eval-table";
  const head = table.insertRow();
  head.append(cell("metric"), ...report.variants.map((v) => cell(v.name)));
  for (const [label, key, digits] of metrics) {
    const row = table.insertRow();
    row.append(cell(label), ...report.variants.map((v) => cell(Number(v[key]).toFixed(digits), "num")));
  }
  const note = document.createElement("p");
  note.className = "muted";
  note.textContent = `${report.rows} rows of ${report.file}, greedy, at most ${report.max_new_tokens} new tokens, ` +
    `template ${report.template}.`;
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
$("ema-weight").textContent = EMA;
$("chat-form").onsubmit = send;
$("reset").onclick = () => { state.history = []; $("messages").replaceChildren(); };
$("prompt").onkeydown = (e) => { if (e.key === "Enter" && !e.shiftKey) send(e); };

refreshRuns();
loadModels();
setInterval(pollMetrics, 1000);
setInterval(refreshRuns, 3000);
