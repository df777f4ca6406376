// The operator view (#/operator): the webhook backlog of this key's tenant, and the pull workers
// seen lately (every tenant sees the same workers).

import { api } from "./api.js";
import { fill, h, notice, time } from "./dom.js";

export function operatorView(root) {
  const controller = new AbortController();
  const hooks = h("div");
  const workers = h("div", { class: "table-wrap" });
  const message = h("div", { "aria-live": "polite" });
  fill(
    root,
    h("div", { class: "heading" }, h("h1", { tabindex: "-1" }, "Operator"), h("button", { type: "button", class: "secondary", onclick: load }, "Refresh")),
    message,
    h("section", { class: "card", "aria-labelledby": "h-backlog" }, h("h2", { id: "h-backlog" }, "Webhook backlog"), hooks),
    h("section", { class: "card", "aria-labelledby": "h-workers" }, h("h2", { id: "h-workers" }, "Workers seen in the last 24 hours"), workers),
  );

  async function load() {
    let data;
    try {
      data = await api("/api/v1/operator", { signal: controller.signal });
    } catch (e) {
      if (e.name !== "AbortError") fill(message, notice("error", e.message));
      return;
    }
    fill(message);
    const w = data.webhooks ?? {};
    fill(
      hooks,
      h(
        "dl",
        { class: "facts" },
        h("dt", {}, "Pending"),
        h("dd", { "data-backlog": "pending" }, String(w.pending ?? 0)),
        h("dt", {}, "Retrying"),
        h("dd", { "data-backlog": "retrying" }, String(w.retrying ?? 0)),
        h("dt", {}, "Failed"),
        h("dd", { "data-backlog": "failed" }, String(w.failed ?? 0)),
        h("dt", {}, "Oldest due"),
        h("dd", {}, w.oldestDueAt ? time(w.oldestDueAt) : "—"),
      ),
    );
    const list = data.workers ?? [];
    fill(
      workers,
      list.length === 0
        ? h("p", { class: "muted" }, "No pull worker has been seen.")
        : h(
            "table",
            { class: "tasks" },
            h("thead", {}, h("tr", {}, ["Worker", "Node", "Models", "Last seen"].map((c) => h("th", { scope: "col" }, c)))),
            h(
              "tbody",
              {},
              list.map((x) =>
                h(
                  "tr",
                  {},
                  h("td", { "data-label": "Worker" }, x.name),
                  h("td", { "data-label": "Node" }, x.node ?? "—"),
                  h("td", { "data-label": "Models" }, (x.models ?? []).join(", ")),
                  h("td", { "data-label": "Last seen" }, time(x.lastSeenAt)),
                ),
              ),
            ),
          ),
    );
  }

  load();
  return () => controller.abort();
}
