// Dashboard: what /v1/metrics holds, as a person wants to see it. Charts of feedback over time by split and
// by label (GET /v1/metrics/feedback-series: days, or hours when all of it is from today), the labels that
// were wasted (pairs across splits), embedding coverage and jobs by status; then the rest as cards of figures.
import { api } from "./api.js";
import { barList, stackedBars } from "./charts.js";

const SPLITS = [
  ["train", "split-train", "train"], ["val", "split-val", "val"], ["test", "split-test", "test"],
  ["regression", "split-regression", "regression"], ["cross", "split-cross", "cross (wasted)"],
];
const LABELS = [["1", "label-same", "same"], ["0", "label-different", "different"]];
const CHARTED = new Set(["feedback", "faces", "jobs"]);

function card(title, ...content) {
  const section = document.createElement("div");
  section.className = "card";
  const h = document.createElement("h3");
  h.textContent = title.replaceAll("_", " ");
  section.append(h, ...content);
  return section;
}

function figures(value) {
  const dl = document.createElement("dl");
  const add = (name, v) => {
    if (v !== null && typeof v === "object" && !Array.isArray(v)) {
      for (const [k, inner] of Object.entries(v)) add(name ? `${name} · ${k}` : k, inner);
      return;
    }
    const dt = document.createElement("dt");
    dt.textContent = name.replaceAll("_", " ");
    const dd = document.createElement("dd");
    if (Array.isArray(v)) dd.textContent = `${v.length} values`;
    else dd.textContent = typeof v === "number" && !Number.isInteger(v) ? v.toFixed(3) : String(v);
    dl.append(dt, dd);
  };
  add("", value);
  return dl;
}

async function series() {
  const days = await api("GET", "/v1/metrics/feedback-series?bucket=day&buckets=30");
  const busy = days.points.filter((p) => p.total > 0);
  if (busy.length === 1 && busy[0] === days.points.at(-1)) {
    return api("GET", "/v1/metrics/feedback-series?bucket=hour&buckets=48");
  }
  return days;
}

function overTime(data, keys, by) {
  const hourly = data.bucket === "hour";
  const buckets = data.points.map((point) => {
    const when = new Date(point.start);
    const label = hourly ? when.toLocaleString([], { day: "numeric", hour: "2-digit" }) : when.toLocaleDateString();
    const short = hourly ? `${when.getHours()}h` : `${when.getMonth() + 1}/${when.getDate()}`;
    return { label, short, parts: by(point) };
  });
  const chart = stackedBars(buckets, keys);
  const legend = document.createElement("p");
  legend.className = "legend";
  for (const [, className, name] of keys) {
    legend.append(Object.assign(document.createElement("span"), { className: `swatch ${className}`, textContent: name }));
  }
  return [chart, legend];
}

function bySplit(point) {
  return Object.fromEntries(Object.entries(point.by_split_label).map(([split, n]) => [split, n["1"] + n["0"]]));
}

function byLabel(point) {
  const sum = { 1: 0, 0: 0 };
  for (const n of Object.values(point.by_split_label)) { sum[1] += n["1"]; sum[0] += n["0"]; }
  return sum;
}

function charts(metrics, data) {
  const unit = data.bucket === "hour" ? "hour (last 48)" : "day (last 30)";
  const feedback = metrics.feedback;
  const wasted = feedback.by_split[data.wasted_split] || 0;
  const faces = metrics.faces;
  const coverage = [];
  if (faces.embedded_by_serving_model !== null) {
    coverage.push({ name: "serving model", key: "serving", value: faces.embedded_by_serving_model, of: faces.total, className: "bar" });
  }
  if (faces.embedded_by_active_model !== null) {
    coverage.push({ name: "active model", key: "active", value: faces.embedded_by_active_model, of: faces.total, className: "bar" });
  }
  const jobs = Object.entries(metrics.jobs.by_status).map(([status, value]) => ({ name: status, value, className: `status-${status}` }));
  const wastedNote = document.createElement("p");
  wastedNote.className = "hint";
  wastedNote.textContent = "Pairs whose faces fell in different splits: no job trains or evaluates on them.";
  return [
    card(`feedback per ${unit}, by split`, ...overTime(data, SPLITS, bySplit)),
    card(`feedback per ${unit}, by label`, ...overTime(data, LABELS, byLabel)),
    card("wasted labels", barList([{ name: "across splits", key: "cross", value: wasted, of: feedback.total, className: "split-cross" }]), wastedNote),
    card("embedding coverage", coverage.length ? barList(coverage) : Object.assign(document.createElement("p"), { textContent: "No model is active." })),
    card("jobs by status", barList(jobs)),
  ].map((section, i) => { section.dataset.chart = ["feedback-by-split", "feedback-by-label", "wasted", "coverage", "jobs"][i]; return section; });
}

export async function openDashboard() {
  const root = document.getElementById("dashboard");
  try {
    const [metrics, data] = await Promise.all([api("GET", "/v1/metrics"), series()]);
    const cards = document.createElement("div");
    cards.className = "cards";
    cards.append(...charts(metrics, data));
    for (const [name, value] of Object.entries(metrics)) {
      if (CHARTED.has(name)) continue;
      cards.append(card(name, figures(value !== null && typeof value === "object" ? value : { value })));
    }
    root.replaceChildren(cards);
  } catch (error) {
    root.textContent = `Error: ${error.message}`;
  }
}
