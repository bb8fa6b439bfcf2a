// Review: two faces, S same / D different / K skip / U undo, a counter, images prefetched for what follows.
//
// An answer is posted with its lease (POST /v1/feedback, lease_id). When the lease has expired meanwhile
// (409 lease-expired or unknown-lease) the answer is not lost: it is posted again without the lease, as
// plain feedback on the same pair (source "console"). Undo retracts the last answer (DELETE
// /v1/feedback/{id}) and offers its pair again.
import { api, ApiError, faceImage, forgetImage } from "./api.js";

const PAGE = 10;
const PREFETCH = 2;
const LABELS = { same: 1, different: 0 };
const REASONS = {
  uncertain: "the model is unsure",
  "likely-same": "the model thinks these are the same person",
  "hard-different": "different subjects the model finds alike",
  explore: "a random pair",
};

const $ = (id) => document.getElementById(id);
const state = { queue: [], answered: [], count: 0, busy: false, loading: null, active: false };

function say(text) { $("review-status").textContent = text; }

function prefetch() {
  for (const item of state.queue.slice(0, 1 + PREFETCH)) {
    faceImage(item.face_a.id);
    faceImage(item.face_b.id);
  }
}

async function refill() {
  if (state.queue.length > PREFETCH || state.loading) return state.loading;
  state.loading = api("POST", "/v1/review/leases", { limit: PAGE })
    .then((page) => {
      const held = new Set(state.queue.map((item) => item.lease_id));
      state.queue.push(...page.items.filter((item) => !held.has(item.lease_id)));
      prefetch();
    })
    .finally(() => { state.loading = null; });
  return state.loading;
}

async function show() {
  const item = state.queue[0];
  $("review-count").textContent = String(state.count);
  if (!item) {
    $("review-pair").hidden = true;
    $("review-reason").textContent = "";
    say("No pair to review right now.");
    return;
  }
  const [a, b] = await Promise.all([faceImage(item.face_a.id), faceImage(item.face_b.id)]);
  if (state.queue[0] !== item) return;
  $("face-a").src = a;
  $("face-b").src = b;
  $("subject-a").textContent = item.face_a.subject ?? "(no subject)";
  $("subject-b").textContent = item.face_b.subject ?? "(no subject)";
  const score = item.score.toFixed(3);
  $("review-reason").textContent = `${REASONS[item.reason] || item.reason} · ${item.split} · score ${score}`;
  $("review-pair").hidden = false;
  $("review-pair").dataset.pair = `${item.face_a.id} ${item.face_b.id}`;
  $("review-pair").dataset.lease = item.lease_id || "";
  prefetch();
}

function advance() {
  const done = state.queue.shift();
  if (done && !state.queue.some((i) => [i.face_a.id, i.face_b.id].includes(done.face_a.id))) {
    forgetImage(done.face_a.id);
  }
  if (done && !state.queue.some((i) => [i.face_a.id, i.face_b.id].includes(done.face_b.id))) {
    forgetImage(done.face_b.id);
  }
}

async function post(item, label) {
  const body = { face_a: item.face_a.id, face_b: item.face_b.id, label };
  if (item.lease_id) {
    try {
      return await api("POST", "/v1/feedback", { ...body, lease_id: item.lease_id });
    } catch (error) {
      if (!(error instanceof ApiError && ["lease-expired", "unknown-lease"].includes(error.type))) throw error;
      item.leaseLost = true;
    }
  }
  return api("POST", "/v1/feedback", { ...body, source: "console" });
}

async function act(kind) {
  const item = state.queue[0];
  if (kind === "undo") {
    const last = state.answered.pop();
    if (!last) return say("Nothing to undo.");
    await api("DELETE", `/v1/feedback/${last.feedbackId}`);
    state.count -= 1;
    state.queue.unshift({ ...last.item, lease_id: null });
    say("The last answer was retracted.");
    return show();
  }
  if (!item) return;
  if (kind === "skip") {
    if (item.lease_id) await api("DELETE", `/v1/review/leases/${item.lease_id}`).catch(() => {});
    say("Skipped.");
  } else {
    const stored = await post(item, LABELS[kind]);
    state.answered.push({ feedbackId: stored.id, item });
    state.count += 1;
    say(item.leaseLost ? `The lease had ended: the answer (${kind}) was kept as plain feedback.` : `Saved: ${kind}.`);
  }
  advance();
  await show();
  await refill();
  if (state.queue.length && $("review-pair").hidden) await show();
}

async function run(kind) {
  if (state.busy) return;
  state.busy = true;
  document.body.dataset.busy = "true";
  try {
    await act(kind);
  } catch (error) {
    say(`Error: ${error.message}`);
  } finally {
    state.busy = false;
    document.body.dataset.busy = "false";
  }
}

const KEYS = { s: "same", d: "different", k: "skip", u: "undo" };

export function setupReview() {
  document.addEventListener("keydown", (event) => {
    if (!state.active || event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target instanceof HTMLInputElement) return;
    const kind = KEYS[event.key.toLowerCase()];
    if (kind) {
      event.preventDefault();
      run(kind);
    }
  });
  for (const button of document.querySelectorAll("[data-answer]")) {
    button.addEventListener("click", () => run(button.dataset.answer));
  }
}

export async function openReview(scopes) {
  state.active = true;
  const canAnswer = scopes.has("feedback:write") && scopes.has("faces:read");
  $("review-buttons").hidden = !canAnswer;
  if (!canAnswer) return say("This key may lease pairs but not answer them (needs feedback:write, faces:read).");
  if (state.queue.length) return show();
  say("Loading pairs…");
  try {
    await refill();
    say("");
    await show();
  } catch (error) {
    say(`Error: ${error.message}`);
  }
}

export function closeReview() { state.active = false; }
