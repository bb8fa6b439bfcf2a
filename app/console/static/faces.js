// Faces: a grid filtered by subject or split, each face marked embedded or not, with its quality by the serving
// model (the norm of its embedding before normalising: MagFace's quality); a click shows its nearest faces by
// the serving model (POST /v1/search), with their scores.
import { api, faceImage } from "./api.js";

const $ = (id) => document.getElementById(id);
const PAGE = 48;

function say(text) { $("faces-status").textContent = text; }

function tile(face, caption) {
  const figure = document.createElement("figure");
  figure.className = "tile";
  figure.dataset.face = face.id;
  const img = document.createElement("img");
  img.alt = face.subject || "face";
  faceImage(face.id).then((url) => { img.src = url; }, () => { img.alt = "image unavailable"; });
  const text = document.createElement("figcaption");
  text.textContent = caption;
  figure.append(img, text);
  return figure;
}

async function nearest(face) {
  const panel = $("faces-nearest");
  panel.replaceChildren(Object.assign(document.createElement("h2"), { textContent: `Nearest to ${face.subject || face.id.slice(0, 8)}` }));
  try {
    const found = await api("POST", "/v1/search", { face: face.id, k: 8 });
    const grid = document.createElement("div");
    grid.className = "grid";
    for (const match of found.results) {
      const verdict = match.same === null ? "" : match.same ? " · same" : " · different";
      grid.append(tile(match, `${match.subject || "–"} · ${match.score.toFixed(3)}${verdict}`));
    }
    panel.append(grid);
  } catch (error) {
    panel.append(Object.assign(document.createElement("p"), { className: "error", textContent: error.message }));
  }
}

async function load(event) {
  event?.preventDefault();
  const form = $("faces-form");
  const query = new URLSearchParams({ limit: String(PAGE) });
  if (form.subject.value.trim()) query.set("subject", form.subject.value.trim());
  if (form.split.value) query.set("split", form.split.value);
  try {
    const page = await api("GET", `/v1/faces?${query}`);
    // Quality has no fixed scale across models: each meter is relative to the best face on the page.
    const best = Math.max(1e-9, ...page.items.map((face) => face.quality ?? 0));
    const grid = document.createElement("div");
    grid.className = "grid";
    for (const face of page.items) {
      const state = face.embedded ? `embedded · quality ${face.quality.toFixed(1)}` : "not embedded";
      const figure = tile(face, `${face.subject || "–"} · ${face.split} · ${state}`);
      figure.dataset.embedded = String(face.embedded);
      if (face.embedded) {
        figure.dataset.quality = String(face.quality);
        const meter = Object.assign(document.createElement("meter"), { min: 0, max: best, value: face.quality });
        meter.title = `quality ${face.quality.toFixed(2)}: the norm of its embedding (higher: a clearer face)`;
        figure.append(meter);
      }
      figure.addEventListener("click", () => nearest(face));
      grid.append(figure);
    }
    $("faces-grid").replaceChildren(grid);
    say(page.items.length ? `${page.items.length} faces${page.next_cursor ? " (the newest)" : ""}` : "No faces.");
  } catch (error) {
    say(`Error: ${error.message}`);
  }
}

export function setupFaces() {
  $("faces-form").addEventListener("submit", load);
}

export async function openFaces() {
  await load();
}
