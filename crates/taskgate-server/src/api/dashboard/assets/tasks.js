// The task table: filters, search by id, pages through GET /api/v1/tasks by its cursor, and
// cancel buttons on unfinished rows. Filters and the page survive visits to a task page.

import { api, ApiError, FINAL, findTask, models, noteTaskModel, q } from "./api.js";
import { duration, fill, h, notice, stateBadge, time } from "./dom.js";

const RANGES = [
  ["", "Any time"],
  ["3600000", "Last hour"],
  ["86400000", "Last 24 hours"],
  ["604800000", "Last 7 days"],
  ["2592000000", "Last 30 days"],
];

// What the table shows: the filters, and the cursors of the pages visited (the first page has
// none), so Previous goes back the way Next came.
const view = { model: "", state: "", range: "", cursors: [undefined], page: 0, next: null, after: undefined };

export function tasksView(root) {
  const controller = new AbortController();
  const message = h("div", { "aria-live": "polite" });
  const body = h("tbody");
  const status = h("p", { class: "muted", "aria-live": "polite" });
  const prev = h("button", { type: "button", class: "secondary", onclick: () => go(view.page - 1) }, "Previous");
  const next = h("button", { type: "button", class: "secondary", onclick: () => go(view.page + 1) }, "Next");

  const modelSelect = h("select", { id: "f-model", name: "model" }, h("option", { value: "" }, "All models"));
  const stateSelect = h(
    "select",
    { id: "f-state", name: "state" },
    h("option", { value: "" }, "All states"),
    ["pending", "processing", "success", "failed"].map((s) => h("option", { value: s }, s)),
  );
  const rangeSelect = h("select", { id: "f-range", name: "range" }, RANGES.map(([v, t]) => h("option", { value: v }, t)));
  stateSelect.value = view.state;
  rangeSelect.value = view.range;

  const filters = h(
    "form",
    { class: "filters", onsubmit: (e) => (e.preventDefault(), applyFilters()), "aria-label": "Filters" },
    h("div", { class: "field" }, h("label", { for: "f-model" }, "Model"), modelSelect),
    h("div", { class: "field" }, h("label", { for: "f-state" }, "State"), stateSelect),
    h("div", { class: "field" }, h("label", { for: "f-range" }, "Created"), rangeSelect),
    h("div", { class: "field actions" }, h("button", { type: "submit" }, "Apply"), h("button", { type: "button", class: "secondary", onclick: () => load() }, "Refresh")),
  );
  for (const s of [modelSelect, stateSelect, rangeSelect]) s.addEventListener("change", applyFilters);

  const searchInput = h("input", { id: "f-task", name: "taskId", placeholder: "task_…", autocomplete: "off", spellcheck: "false", required: true });
  const searchMsg = h("div", { "aria-live": "polite" });
  const search = h(
    "form",
    { class: "search", role: "search", onsubmit: onSearch },
    h("label", { for: "f-task" }, "Open a task by id"),
    h("div", { class: "inline" }, searchInput, h("button", { type: "submit" }, "Open")),
    searchMsg,
  );

  fill(
    root,
    h("div", { class: "heading" }, h("h1", { tabindex: "-1" }, "Tasks"), h("a", { class: "button", href: "#/new" }, "New task")),
    search,
    filters,
    message,
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { class: "tasks" },
        h("thead", {}, h("tr", {}, ["Task", "Model", "State", "Created", "Time", "Actions"].map((c) => h("th", { scope: "col" }, c)))),
        body,
      ),
    ),
    h("div", { class: "pager" }, prev, status, next),
  );

  models().then(
    (list) => {
      for (const m of list) modelSelect.append(h("option", { value: m.model }, m.model));
      modelSelect.value = view.model;
    },
    () => {},
  );

  async function onSearch(e) {
    e.preventDefault();
    const id = searchInput.value.trim();
    if (!id) return;
    fill(searchMsg, notice("info", "Looking…"));
    try {
      const found = await findTask(id);
      if (found) location.hash = `#/tasks/${encodeURIComponent(id)}`;
      else fill(searchMsg, notice("error", `No task with id ${id} under any model this key may use.`));
    } catch (err) {
      fill(searchMsg, notice("error", err.message));
    }
  }

  function applyFilters() {
    view.model = modelSelect.value;
    view.state = stateSelect.value;
    view.range = rangeSelect.value;
    // A time range is fixed when applied, so the pages of one listing agree with each other.
    view.after = view.range ? Date.now() - Number(view.range) : undefined;
    view.cursors = [undefined];
    view.page = 0;
    load();
  }

  function go(page) {
    if (page < 0) return;
    if (page > view.page) {
      if (!view.next) return;
      view.cursors[page] = view.next;
    }
    view.page = page;
    load();
  }

  async function load() {
    const params = ["limit=20"];
    if (view.model) params.push(`model=${q(view.model)}`);
    if (view.state) params.push(`state=${q(view.state)}`);
    if (view.after !== undefined) params.push(`createdAfter=${view.after}`);
    const cursor = view.cursors[view.page];
    if (cursor) params.push(`cursor=${q(cursor)}`);
    let data;
    try {
      data = await api(`/api/v1/tasks?${params.join("&")}`, { signal: controller.signal });
    } catch (e) {
      if (e.name !== "AbortError") fill(message, notice("error", e.message));
      return;
    }
    fill(message);
    view.next = data.nextCursor ?? null;
    const tasks = data.tasks ?? [];
    fill(body, tasks.length === 0 ? h("tr", {}, h("td", { colspan: 6 }, "No tasks on this page.")) : tasks.map(row));
    prev.disabled = view.page === 0;
    next.disabled = !view.next;
    status.textContent = `Page ${view.page + 1}`;
  }

  function row(t) {
    noteTaskModel(t.taskId, t.model);
    const finished = FINAL.has(t.state);
    let timing = "—";
    if (t.state === "success") timing = duration(t.costTime);
    else if (t.state === "failed") timing = duration(t.completeTime - t.createTime);
    else if (t.progress !== undefined) timing = `${Math.round(t.progress * 100)} %`;
    else if (t.queuePosition !== undefined) timing = `queue #${t.queuePosition}`;
    return h(
      "tr",
      { "data-task": t.taskId },
      h("td", { "data-label": "Task" }, h("a", { href: `#/tasks/${encodeURIComponent(t.taskId)}`, class: "mono" }, t.taskId)),
      h("td", { "data-label": "Model" }, t.model),
      h("td", { "data-label": "State" }, stateBadge(t.state), t.failCode ? h("span", { class: "failcode" }, ` ${t.failCode}`) : null),
      h("td", { "data-label": "Created" }, time(t.createTime)),
      h("td", { "data-label": "Time" }, timing),
      h(
        "td",
        { "data-label": "Actions" },
        finished ? null : h("button", { type: "button", class: "danger", "aria-label": `Cancel ${t.taskId}`, onclick: (e) => cancel(e.target, t) }, "Cancel"),
      ),
    );
  }

  async function cancel(button, t) {
    button.disabled = true;
    try {
      await api(`/api/v1/cancelTask/${q(t.model)}?taskId=${q(t.taskId)}`, { method: "POST" });
      fill(message, notice("ok", `Cancelled ${t.taskId}.`));
    } catch (e) {
      // 409: it finished meanwhile; the reload shows how.
      fill(message, notice(e instanceof ApiError && e.status === 409 ? "info" : "error", e.message));
    }
    await load();
    // The row was drawn again without its button: keep the keyboard on that row's link.
    body.querySelector(`tr[data-task="${CSS.escape(t.taskId)}"] a`)?.focus();
  }

  // The first page follows the live counts: a change of counts means a task moved. Not while
  // the keyboard is in the table, so a re-render does not pull focus from under the user.
  let pending;
  const onCounts = () => {
    if (view.page !== 0 || body.contains(document.activeElement)) return;
    clearTimeout(pending);
    pending = setTimeout(load, 300);
  };
  window.addEventListener("taskgate:counts", onCounts);

  load();
  return () => {
    controller.abort();
    clearTimeout(pending);
    window.removeEventListener("taskgate:counts", onCounts);
  };
}
