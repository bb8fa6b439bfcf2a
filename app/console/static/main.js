// The console's shell: the key (sessionStorage of this tab only), what it may do (GET /v1/keys/me), pages.
import { api, session } from "./api.js";
import { closeReview, openReview, setupReview } from "./review.js";
import { closeJobs, openJobs, setupJobs } from "./jobs.js";
import { openDashboard } from "./dashboard.js";
import { openModels } from "./models.js";
import { openFaces, setupFaces } from "./faces.js";

const $ = (id) => document.getElementById(id);
const PAGES = {
  review: { open: openReview, close: closeReview },
  jobs: { open: openJobs, close: closeJobs },
  models: { open: openModels, close: () => {} },
  faces: { open: openFaces, close: () => {} },
  dashboard: { open: openDashboard, close: () => {} },
};
let scopes = new Set();
let current = null;

function show(name) {
  if (current && current !== name) PAGES[current].close();
  current = name;
  for (const button of document.querySelectorAll("#nav button")) {
    button.classList.toggle("active", button.dataset.page === name);
  }
  for (const page of document.querySelectorAll(".page")) page.hidden = page.id !== `page-${name}`;
  document.body.dataset.page = name;
  PAGES[name].open(scopes);
}

function signOut() {
  session.key = null;
  location.reload();
}

async function signIn() {
  let me;
  try {
    me = await api("GET", "/v1/keys/me");
  } catch (error) {
    session.key = null;
    $("login-error").textContent = `This key was refused: ${error.message}`;
    return;
  }
  scopes = new Set(me.scopes);
  $("login").hidden = true;
  $("pages").hidden = false;
  $("nav").hidden = false;
  const who = $("who");
  who.textContent = me.auth_disabled ? "auth disabled" : `${me.name} (${me.id}) · ${me.scopes.join(", ")}`;
  const out = document.createElement("button");
  out.type = "button";
  out.textContent = "Forget key";
  out.addEventListener("click", signOut);
  who.append(out);
  const allowed = [...document.querySelectorAll("#nav button")].filter((b) => scopes.has(b.dataset.scope));
  for (const button of document.querySelectorAll("#nav button")) {
    button.hidden = !allowed.includes(button);
    button.addEventListener("click", () => show(button.dataset.page));
  }
  if (allowed.length) show(allowed[0].dataset.page);
  else $("who").prepend("This key may use none of the console's pages. ");
}

setupReview();
setupJobs();
setupFaces();
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  session.key = $("key-input").value.trim();
  $("key-input").value = "";
  signIn();
});
if (session.key) signIn();
