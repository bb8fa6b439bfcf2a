// Jobs: the list with live progress from each unfinished job's event stream, cancel, start a fine-tune, and
// the loss / val figures per epoch as an inline SVG chart.
import { api, followJob } from "./api.js";
import { svg } from "./charts.js";

const $ = (id) => document.getElementById(id);
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
const followed = new Map(); // job id -> AbortController
const epochs = new Map(); // job id -> [{epoch, loss, val_loss}]
let scopes = new Set();

function say(text) { $("jobs-status").textContent = text; }

function cell(row, text) {
  const td = document.createElement("td");
  if (text instanceof Node) td.append(text); else td.textContent = text ?? "";
  row.append(td);
  return td;
}

function chart(points) {
  const w = 220, h = 60, pad = 4;
  const box = svg("svg", { class: "chart", width: w, height: h });
  const values = points.flatMap((p) => [p.loss, p.val_loss]).filter((v) => typeof v === "number");
  if (points.length === 0 || values.length === 0) return box;
  const lo = Math.min(...values), hi = Math.max(...values), span = hi - lo || 1;
  const x = (i) => pad + (points.length === 1 ? (w - 2 * pad) / 2 : (i * (w - 2 * pad)) / (points.length - 1));
  const y = (v) => h - pad - ((v - lo) * (h - 2 * pad)) / span;
  for (const [key, cls] of [["loss", "loss"], ["val_loss", "val"]]) {
    const d = points
      .map((p, i) => (typeof p[key] === "number" ? `${x(i).toFixed(1)},${y(p[key]).toFixed(1)}` : null))
      .filter(Boolean);
    if (!d.length) continue;
    const title = `${key}: ${points.map((p) => p[key]?.toFixed?.(4) ?? "–").join(", ")}`;
    box.append(svg("polyline", { class: cls, points: d.join(" ") }, svg("title", {}, title)));
  }
  return box;
}

function progressOf(job) {
  const p = job.progress || {};
  const bar = document.createElement("progress");
  bar.max = 1;
  if (FINISHED.has(job.status)) bar.value = 1;
  else if (p.epochs && p.steps) bar.value = ((p.epoch - 1) + (p.step || 0) / p.steps) / p.epochs;
  else bar.removeAttribute("value");
  const label = document.createElement("span");
  const where = `${p.phase || ""}${p.epoch ? ` epoch ${p.epoch}/${p.epochs}` : ""}`;
  label.textContent = ` ${job.status === "failed" && job.error ? job.error.title || where : where}`;
  if (job.error?.detail) label.title = job.error.detail;
  const span = document.createElement("span");
  span.append(bar, label);
  return span;
}

function record(job) {
  // The result's history is the whole story (epoch 0: the parent on val); the stream's "epoch" events give
  // the points while the job runs (one that lasted less than a poll may be coalesced into the next state).
  if (Array.isArray(job.result?.history)) {
    epochs.set(job.id, job.result.history.map((r) => ({ epoch: r.epoch, loss: r.train_loss, val_loss: r.val_loss })));
    return;
  }
  const p = job.progress;
  if (!p || p.phase !== "epoch") return;
  const list = epochs.get(job.id) || [];
  if (!list.some((e) => e.epoch === p.epoch)) list.push({ epoch: p.epoch, loss: p.loss, val_loss: p.val_loss });
  epochs.set(job.id, list);
}

function render(job) {
  let row = document.querySelector(`tr[data-job="${job.id}"]`);
  const fresh = document.createElement("tr");
  fresh.dataset.job = job.id;
  fresh.dataset.status = job.status;
  // What this row went through (statuses and phases seen), for whoever watches the page, tests included.
  const seen = new Set((row?.dataset.seen || "").split(" ").filter(Boolean)).add(job.status);
  const phase = job.progress?.phase;
  const phases = new Set((row?.dataset.phases || "").split(" ").filter(Boolean));
  if (phase) phases.add(phase);
  fresh.dataset.seen = [...seen].join(" ");
  fresh.dataset.phases = [...phases].join(" ");
  cell(fresh, job.id.slice(0, 8)).title = job.id;
  const kind = job.kind || row?.dataset.kind;
  fresh.dataset.kind = kind;
  cell(fresh, kind);
  cell(fresh, job.status);
  cell(fresh, progressOf(job));
  record(job);
  cell(fresh, kind === "finetune" ? chart(epochs.get(job.id) || []) : "");
  const actions = cell(fresh, "");
  if (scopes.has("jobs:write") && !FINISHED.has(job.status) && !job.cancel_requested) {
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.className = "cancel";
    cancel.textContent = "Cancel";
    cancel.addEventListener("click", async () => {
      try { render({ ...job, ...(await api("POST", `/v1/jobs/${job.id}/cancel`)) }); } catch (e) { say(e.message); }
    });
    actions.append(cancel);
  }
  if (row) row.replaceWith(fresh); else $("jobs-table").tBodies[0].prepend(fresh);
}

function follow(job) {
  if (FINISHED.has(job.status) || followed.has(job.id)) return;
  const controller = new AbortController();
  followed.set(job.id, controller);
  followJob(job.id, (_kind, data) => render({ kind: job.kind, ...data }), controller.signal)
    .catch((error) => { if (error.name !== "AbortError") say(`${job.id.slice(0, 8)}: ${error.message}`); })
    .finally(() => followed.delete(job.id));
}

async function startFinetune(event) {
  event.preventDefault();
  const form = event.target;
  const params = {
    epochs: Number(form.epochs.value),
    learning_rate: Number(form.learning_rate.value),
    batch_size: Number(form.batch_size.value),
    auto_promote: form.auto_promote.checked,
  };
  try {
    const job = await api("POST", "/v1/jobs", { kind: "finetune", params });
    render(job);
    follow(job);
    say(`Fine-tune ${job.id.slice(0, 8)} queued.`);
  } catch (error) {
    say(`Error: ${error.message}`);
  }
}

export function setupJobs() {
  $("finetune-form").addEventListener("submit", startFinetune);
}

export async function openJobs(keyScopes) {
  scopes = keyScopes;
  $("finetune-form").hidden = !scopes.has("jobs:write");
  try {
    const page = await api("GET", "/v1/jobs?limit=25");
    $("jobs-table").tBodies[0].replaceChildren();
    for (const job of [...page.items].reverse()) render(job);
    for (const job of page.items) follow(job);
    say(page.items.length ? "" : "No jobs yet.");
  } catch (error) {
    say(`Error: ${error.message}`);
  }
}

export function closeJobs() {
  for (const controller of followed.values()) controller.abort();
  followed.clear();
}
