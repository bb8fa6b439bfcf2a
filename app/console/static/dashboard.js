// Dashboard: what /v1/metrics holds, as cards of figures (one per section of the answer).
import { api } from "./api.js";

function card(title, value) {
  const section = document.createElement("div");
  section.className = "card";
  const h = document.createElement("h3");
  h.textContent = title.replaceAll("_", " ");
  const dl = document.createElement("dl");
  const add = (name, v) => {
    if (v !== null && typeof v === "object") {
      for (const [k, inner] of Object.entries(v)) add(name ? `${name} · ${k}` : k, inner);
      return;
    }
    const dt = document.createElement("dt");
    dt.textContent = name.replaceAll("_", " ");
    const dd = document.createElement("dd");
    dd.textContent = typeof v === "number" && !Number.isInteger(v) ? v.toFixed(3) : String(v);
    dl.append(dt, dd);
  };
  add("", value);
  section.append(h, dl);
  return section;
}

export async function openDashboard() {
  const root = document.getElementById("dashboard");
  try {
    const metrics = await api("GET", "/v1/metrics");
    const cards = document.createElement("div");
    cards.className = "cards";
    for (const [name, value] of Object.entries(metrics)) {
      cards.append(card(name, value !== null && typeof value === "object" ? value : { value }));
    }
    root.replaceChildren(cards);
  } catch (error) {
    root.textContent = `Error: ${error.message}`;
  }
}
