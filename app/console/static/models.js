// Models: the lineage as a tree, each model's newest figures per split beside its parent's, the ROC curves of
// a candidate and its parent on the same pairs, the activation log, and activate / roll back
// (models:activate) after a confirmation that names the model in service.
import { api } from "./api.js";
import { unitLines } from "./charts.js";

const $ = (id) => document.getElementById(id);
// name -> how to read it from an evaluation's metrics (worker/ml/metrics.py pair_metrics)
const SHOWN = {
  "ROC AUC": (m) => m.roc_auc,
  EER: (m) => m.eer,
  "best accuracy": (m) => m.best_accuracy?.accuracy,
  pairs: (m) => m.counts?.pairs,
};
let scopes = new Set();

function say(text) { $("models-status").textContent = text; }
const short = (id) => (id ? id.slice(0, 8) : "–");
const label = (m) => `${m.name || short(m.id)} (${m.arch})`;
const fmt = (v) => (typeof v === "number" ? v.toFixed(4) : "–");

function figures(model) {
  const newest = {};
  for (const e of model.evaluations || []) if (!newest[e.split]) newest[e.split] = e;
  return newest;
}

function compare(model, parent) {
  const mine = figures(model);
  const theirs = parent ? figures(parent) : {};
  const table = document.createElement("table");
  table.className = "figures";
  for (const [split, e] of Object.entries(mine)) {
    for (const [name, read] of Object.entries(SHOWN)) {
      const value = read(e.metrics || {});
      if (value === undefined || value === null) continue;
      const row = table.insertRow();
      row.insertCell().textContent = `${split} ${name}`;
      row.insertCell().textContent = name === "pairs" ? String(value) : fmt(value);
      const other = theirs[split] ? read(theirs[split].metrics || {}) : undefined;
      row.insertCell().textContent = parent ? `parent ${name === "pairs" ? other ?? "–" : fmt(other)}` : "";
    }
  }
  return table;
}

// The candidate's ROC and its parent's on the same pairs: the evaluations one job recorded for both on one
// set (same pairs_sha256; worker/jobs/comparison.py), newest first; one chart per set (test, regression).
function rocCurves(model, parent) {
  const box = document.createElement("div");
  box.className = "roc";
  if (!parent) return box;
  for (const split of ["test", "regression"]) {
    const mine = (model.evaluations || []).find((e) => e.split === split && e.metrics?.roc
      && (parent.evaluations || []).some((p) => p.split === split && p.pairs_sha256 === e.pairs_sha256 && p.metrics?.roc));
    if (!mine) continue;
    const theirs = parent.evaluations.filter((p) => p.split === split && p.pairs_sha256 === mine.pairs_sha256 && p.metrics?.roc);
    const same = theirs.find((p) => p.job_id === mine.job_id) || theirs[0];
    const line = (e, who, className) => ({
      x: e.metrics.roc.far, y: e.metrics.roc.tar, className, label: `${who} AUC ${fmt(e.metrics.roc_auc)}`,
    });
    const chart = unitLines([line(same, "parent", "parent"), line(mine, "candidate", "candidate")], {
      xLabel: `FAR (${split}, ${mine.pair_count} pairs)`, yLabel: "TAR", className: "roc",
    });
    chart.dataset.split = split;
    chart.dataset.pairs = mine.pairs_sha256;
    box.append(chart);
  }
  return box;
}

// The promotion gate's decision on a fine-tuned model (its job's result): passed or not, the reasons, and
// the bootstrap intervals of the candidate − parent differences.
function gate(jobId) {
  const box = document.createElement("div");
  box.className = "gate";
  api("GET", `/v1/jobs/${jobId}`).then((job) => {
    const decision = job.result?.gate;
    if (!decision) return;
    const head = document.createElement("div");
    head.className = decision.passed ? "passed" : "refused";
    head.textContent = `gate: ${decision.passed ? "passed" : "refused"}${decision.promoted ? ", promoted" : ""}`;
    const reasons = document.createElement("ul");
    for (const reason of decision.reasons || []) reasons.append(Object.assign(document.createElement("li"), { textContent: reason }));
    box.append(head, reasons);
    for (const [split, figures] of Object.entries(decision.intervals || {})) {
      for (const [name, i] of Object.entries(figures || {})) {
        if (!i || typeof i !== "object" || !("estimate" in i)) continue;
        const line = document.createElement("div");
        line.className = "interval";
        line.textContent = `${split} Δ${name}: ${fmt(i.estimate)} [${fmt(i.low)}, ${fmt(i.high)}]`;
        box.append(line);
      }
    }
  }, () => {});
  return box;
}

async function activate(model, active) {
  const now = active ? label(active) : "no model";
  if (!window.confirm(`Put ${label(model)} in service? It replaces ${now}, which is in service now.`)) return;
  try {
    await api("POST", `/v1/models/${model.id}/activate`, { reason: "from the console" });
    say(`${label(model)} is in service; its reindex is queued.`);
    await openModels(scopes);
  } catch (error) {
    say(`Error: ${error.message}`);
  }
}

function node(model, byParent, byId, active) {
  const li = document.createElement("li");
  li.dataset.model = model.id;
  li.dataset.active = String(model.is_active);
  const head = document.createElement("div");
  head.className = "model";
  head.textContent = `${label(model)} · ${model.status}${model.is_active ? " · in service" : ""}`;
  head.title = model.id;
  if (scopes.has("models:activate") && model.status === "ready" && !model.is_active) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "activate";
    button.textContent = active && model.created_at < active.created_at ? "Roll back to this" : "Activate";
    button.addEventListener("click", () => activate(model, active));
    head.append(" ", button);
  }
  const parent = byId.get(model.parent_id);
  li.append(head, compare(model, parent), rocCurves(model, parent));
  if (model.created_by_job_id && scopes.has("jobs:read")) li.append(gate(model.created_by_job_id));
  const children = byParent.get(model.id) || [];
  if (children.length) {
    const ul = document.createElement("ul");
    for (const child of children) ul.append(node(child, byParent, byId, active));
    li.append(ul);
  }
  return li;
}

export async function openModels(keyScopes) {
  scopes = keyScopes;
  try {
    const [models, log] = await Promise.all([
      api("GET", "/v1/models?limit=100"),
      api("GET", "/v1/models/activations?limit=20"),
    ]);
    const byId = new Map(models.items.map((m) => [m.id, m]));
    const byParent = new Map();
    const roots = [];
    for (const m of models.items) {
      if (m.parent_id && byId.has(m.parent_id)) {
        byParent.set(m.parent_id, [...(byParent.get(m.parent_id) || []), m]);
      } else roots.push(m);
    }
    const active = models.items.find((m) => m.is_active);
    const tree = document.createElement("ul");
    tree.className = "tree";
    for (const root of roots) tree.append(node(root, byParent, byId, active));
    $("models-tree").replaceChildren(tree);

    const body = $("activations-table").tBodies[0];
    body.replaceChildren();
    for (const a of log.items) {
      const row = body.insertRow();
      row.dataset.model = a.model_id;
      row.insertCell().textContent = new Date(a.created_at).toLocaleString();
      row.insertCell().textContent = byId.has(a.model_id) ? label(byId.get(a.model_id)) : short(a.model_id);
      const before = byId.get(a.previous_model_id);
      row.insertCell().textContent = before ? label(before) : short(a.previous_model_id);
      row.insertCell().textContent = a.actor || "";
      row.insertCell().textContent = a.reason || "";
    }
    if (!models.items.length) say("No model yet: upload a checkpoint (POST /v1/models).");
  } catch (error) {
    say(`Error: ${error.message}`);
  }
}
