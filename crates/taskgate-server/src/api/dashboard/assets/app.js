// The dashboard's entry point: sign-in, the live counts, and the hash router that shows one view
// at a time. Routes: #/tasks, #/tasks/<id>, #/new, #/operator. Routes never carry the key.

import { api, clearKey, forgetModels, getKey, setKey, whenUnauthorized } from "./api.js";
import { fill, h, notice } from "./dom.js";
import { liveSse } from "./sse.js";
import { tasksView } from "./tasks.js";
import { newTaskView, taskView } from "./task.js";
import { operatorView } from "./operator.js";

const $ = (id) => document.getElementById(id);

let stopCounts = () => {};
let stopView = () => {};

/** The last counts event, for views that want it at once. */
export let lastCounts;

function signedIn() {
  return Boolean(getKey());
}

function signOut(message) {
  stopCounts();
  stopView();
  clearKey();
  forgetModels();
  fill($("view"));
  fill($("counts-body"));
  showShell();
  fill($("signin-message"), message ? notice("error", message) : null);
  $("signin-key").focus();
}

function showShell() {
  const inside = signedIn();
  $("signin").hidden = inside;
  $("nav").hidden = !inside;
  $("counts").hidden = !inside;
}

async function onSignIn(event) {
  event.preventDefault();
  const key = $("signin-key").value.trim();
  if (!key) return;
  const button = event.target.querySelector("button");
  button.disabled = true;
  fill($("signin-message"), notice("info", "Checking the key…"));
  try {
    // Any authenticated read proves the key; the model list is needed next anyway.
    await api("/api/v1/models", { key });
  } catch (e) {
    fill($("signin-message"), notice("error", e.message));
    button.disabled = false;
    return;
  }
  button.disabled = false;
  $("signin-key").value = "";
  fill($("signin-message"));
  setKey(key);
  start();
}

function start() {
  showShell();
  startCounts();
  if (!location.hash || location.hash === "#" || location.hash === "#/") location.hash = "#/tasks";
  route();
}

function startCounts() {
  stopCounts();
  stopCounts = liveSse("/api/v1/streamTaskCounts", {
    onEvent: (type, data) => {
      if (type !== "counts" || typeof data !== "object") return;
      lastCounts = data;
      renderCounts(data);
      window.dispatchEvent(new CustomEvent("taskgate:counts", { detail: data }));
    },
    onState: (state, error) => {
      if (error?.status === 401) {
        signOut(error.message);
        return;
      }
      $("counts-state").textContent =
        state === "open" ? "(live)" : `(reconnecting${error ? `: ${error.message}` : ""})`;
    },
  });
}

const STATES = ["pending", "processing", "success", "failed"];

function renderCounts(data) {
  const row = (label, counts, model) =>
    h(
      "tr",
      {},
      h("th", { scope: "row" }, label),
      STATES.map((s) =>
        h("td", { "data-model": model, "data-state": s, class: `num state-${s}` }, String(counts[s] ?? 0)),
      ),
    );
  const models = data.models ?? [];
  fill(
    $("counts-body"),
    h(
      "table",
      { class: "counts-table" },
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Model"), STATES.map((s) => h("th", { scope: "col" }, s)))),
      h(
        "tbody",
        {},
        models.length === 0 ? h("tr", {}, h("td", { colspan: 5 }, "No tasks yet.")) : models.map((m) => row(m.model, m, m.model)),
      ),
      h("tfoot", {}, row("All", data.total ?? {}, "*")),
    ),
  );
}

function route() {
  stopView();
  stopView = () => {};
  if (!signedIn()) return;
  const hash = location.hash.replace(/^#/, "");
  const view = $("view");
  fill(view);
  let m;
  if ((m = hash.match(/^\/tasks\/([^/]+)$/))) {
    stopView = taskView(view, decodeURIComponent(m[1]));
  } else if (hash === "/new") {
    stopView = newTaskView(view);
  } else if (hash === "/operator") {
    stopView = operatorView(view);
  } else {
    stopView = tasksView(view);
  }
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.getAttribute("href") === `#${hash}`) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  // Move focus to the new view's heading, as a page load would, for keyboard and screen readers.
  view.querySelector("h1")?.focus();
}

whenUnauthorized((e) => signOut(e.message));
$("signin-form").addEventListener("submit", onSignIn);
$("signout").addEventListener("click", () => signOut());
window.addEventListener("hashchange", route);
if (signedIn()) start();
else showShell();
