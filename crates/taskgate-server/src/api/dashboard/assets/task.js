// The task page (#/tasks/<id>) and the New task form (#/new).

import { api, ApiError, FINAL, findTask, knownTaskModel, models, noteTaskModel, q, recallInput, rememberInput } from "./api.js";
import { duration, fill, h, notice, pretty, stateBadge, time } from "./dom.js";
import { liveSse } from "./sse.js";

const IMAGE = /\.(png|jpe?g|gif|webp|avif|bmp|svg)$/i;
const VIDEO = /\.(mp4|webm|ogv|mov|m4v)$/i;
const AUDIO = /\.(mp3|wav|ogg|oga|flac|m4a|aac|opus)$/i;
const JSONFILE = /\.json$/i;

export function taskView(root, taskId) {
  const controller = new AbortController();
  let stopStream = () => {};
  let model = knownTaskModel(taskId);
  let status;
  let logs = [];
  let lastSeq = 0;
  let shownResults = "";

  const heading = h("h1", { tabindex: "-1", class: "task-title" }, "Task ", h("span", { class: "mono" }, taskId));
  const message = h("div", { "aria-live": "polite" });
  const summary = h("div");
  const progress = h("div");
  const results = h("div");
  const timeline = h("ol", { class: "timeline" });
  const inputBox = h("div");
  const logList = h("ol", { class: "logs", "aria-label": "Log lines" });
  const deliveries = h("div");
  const live = h("span", { class: "muted" });

  fill(
    root,
    h("p", {}, h("a", { href: "#/tasks" }, "← All tasks")),
    heading,
    message,
    h("section", { class: "card", "aria-label": "Summary" }, summary, progress),
    h("section", { class: "card", "aria-labelledby": "h-results" }, h("h2", { id: "h-results" }, "Result"), results),
    h("section", { class: "card", "aria-labelledby": "h-timeline" }, h("h2", { id: "h-timeline" }, "Timeline"), timeline),
    h("section", { class: "card", "aria-labelledby": "h-input" }, h("h2", { id: "h-input" }, "Input"), inputBox),
    h("section", { class: "card", "aria-labelledby": "h-logs" }, h("h2", { id: "h-logs" }, "Logs ", live), logList),
    h("section", { class: "card", "aria-labelledby": "h-hooks" }, h("h2", { id: "h-hooks" }, "Webhook deliveries"), deliveries),
  );

  renderInput(undefined);

  start();

  async function start() {
    try {
      if (!model) {
        const found = await findTask(taskId);
        if (!found) {
          fill(message, notice("error", `No task with id ${taskId} under any model this key may use.`));
          return;
        }
        model = found.model;
      }
      await refresh();
    } catch (e) {
      if (e.name !== "AbortError") fill(message, notice("error", e.message));
      return;
    }
    loadDeliveries();
    if (!FINAL.has(status.state)) follow();
  }

  /** A full read: status with its input, log lines and attempts. */
  async function refresh() {
    const data = await api(`/api/v1/statusTask/${q(model)}?taskId=${q(taskId)}&input=true&logs=true&attempts=true`, {
      signal: controller.signal,
    });
    noteTaskModel(taskId, model);
    status = data;
    // The read brings the newest lines again: start the list over rather than repeat them.
    logs = [];
    lastSeq = 0;
    fill(logList);
    addLogs(data.logs ?? []);
    renderInput(data.input);
    render();
  }

  /**
   * The input as the server accepted it (`data.input`, from `&input=true`); a server without that
   * field leaves only the copy this tab kept of what it submitted.
   */
  function renderInput(fromServer) {
    const input = fromServer ?? recallInput(taskId);
    fill(
      inputBox,
      input !== undefined
        ? h("pre", { class: "json", id: "task-input" }, pretty(input))
        : h("p", { class: "muted" }, "This server does not return a task's input; it is shown only for tasks submitted from this tab."),
    );
  }

  function follow() {
    live.textContent = "(live)";
    let final = false;
    stopStream = liveSse(`/api/v1/streamTask/${q(model)}?taskId=${q(taskId)}`, {
      shouldReconnect: () => !final,
      onState: (state, error) => {
        live.textContent = state === "open" ? "(live)" : `(reconnecting${error ? `: ${error.message}` : ""})`;
      },
      onEvent: async (_type, data) => {
        if (typeof data !== "object" || !data.state) return;
        addLogs(data.logs ?? []);
        const { logs: _, ...rest } = data;
        status = { ...status, ...rest };
        // Fields that belong to one state only go with it.
        for (const k of ["progress", "queuePosition"]) if (!(k in rest)) delete status[k];
        if (FINAL.has(data.state)) {
          final = true;
          live.textContent = "";
          // The final read brings what the stream does not carry: the attempts.
          try {
            await refresh();
          } catch {
            render();
          }
          loadDeliveries();
        } else {
          render();
        }
      },
    });
  }

  function addLogs(lines) {
    for (const l of lines) {
      if (l.seq <= lastSeq) continue;
      lastSeq = l.seq;
      logs.push(l);
      logList.append(h("li", {}, h("span", { class: "muted" }, new Date(l.at).toLocaleTimeString()), " ", h("span", { class: "mono" }, l.line)));
    }
    const empty = logList.querySelector(".empty");
    if (logs.length === 0 && !empty) logList.append(h("li", { class: "muted empty" }, "No log lines."));
    else if (logs.length > 0) empty?.remove();
  }

  function render() {
    const s = status;
    const unfinished = !FINAL.has(s.state);
    fill(
      summary,
      h(
        "dl",
        { class: "facts" },
        h("dt", {}, "Model"),
        h("dd", {}, model),
        h("dt", {}, "State"),
        h("dd", { id: "task-state" }, stateBadge(s.state), s.failCode ? h("span", { class: "failcode", id: "task-failcode" }, ` ${s.failCode}`) : null),
        h("dt", {}, "Created"),
        h("dd", {}, time(s.createTime)),
        s.completeTime ? [h("dt", {}, "Finished"), h("dd", {}, time(s.completeTime))] : null,
        s.costTime !== undefined ? [h("dt", {}, "Took"), h("dd", {}, duration(s.costTime))] : null,
        s.queuePosition !== undefined ? [h("dt", {}, "Queue position"), h("dd", {}, String(s.queuePosition))] : null,
      ),
      s.failMsg ? notice("error", `${s.failCode ?? "failed"}: ${s.failMsg}`) : null,
      unfinished ? h("button", { type: "button", class: "danger", id: "task-cancel", onclick: cancel }, "Cancel task") : null,
    );
    fill(progress, progressBar(s));
    renderTimeline(s);
    renderResults(s);
  }

  function progressBar(s) {
    let value;
    let label;
    if (s.state === "success") [value, label] = [1, "Done"];
    else if (s.state === "failed") return null;
    else if (s.progress !== undefined) [value, label] = [s.progress, `${Math.round(s.progress * 100)} %`];
    else label = s.state === "pending" ? "Waiting to start" : "Running";
    return h(
      "div",
      { class: "progress" },
      h("label", { for: "task-progress" }, "Progress"),
      // Without a value a <progress> is indeterminate: running, amount unknown.
      h("progress", { id: "task-progress", max: 1, value }),
      h("span", {}, label),
    );
  }

  function renderTimeline(s) {
    // Each step is marked (data-step) so that a test can tell an attempt's failCode from the
    // task's final one.
    const items = [["created", "Created", s.createTime]];
    const attempts = s.attempts ?? [];
    if (attempts.length > 0) {
      items.push(["started", "Started", attempts[0].startedAt]);
      for (const a of attempts) {
        const end = a.endedAt ? ` – ${new Date(a.endedAt).toLocaleTimeString()}` : " – running";
        const why = a.failCode ? `: ${a.failCode}${a.failMsg ? ` (${a.failMsg})` : ""}` : "";
        items.push(["attempt", `Attempt ${a.attempt}${a.runner ? ` on ${a.runner}` : ""}${end}${why}`, a.startedAt]);
      }
    } else if (s.state === "processing") {
      items.push(["started", "Started", undefined]);
    }
    if (s.state === "success") items.push(["final", `Succeeded after ${duration(s.costTime)}`, s.completeTime]);
    if (s.state === "failed") items.push(["final", `Failed: ${s.failCode ?? ""}${s.failMsg ? ` — ${s.failMsg}` : ""}`, s.completeTime]);
    fill(
      timeline,
      items.map(([step, what, at]) => h("li", { "data-step": step }, h("span", { class: "when" }, at ? time(at) : "—"), " ", h("span", {}, what))),
    );
  }

  function renderResults(s) {
    let urls = [];
    if (s.resultJson) {
      try {
        urls = JSON.parse(s.resultJson).resultUrls ?? [];
      } catch {
        urls = [];
      }
    }
    const key = urls.join("\n");
    if (key === shownResults && urls.length > 0) return;
    shownResults = key;
    if (urls.length === 0) {
      fill(results, h("p", { class: "muted" }, s.state === "success" ? "No result files." : "No result yet."));
      return;
    }
    fill(results, h("ul", { class: "results" }, urls.map((u) => h("li", {}, preview(u)))));
  }

  async function cancel(e) {
    e.target.disabled = true;
    try {
      status = { ...status, ...(await api(`/api/v1/cancelTask/${q(model)}?taskId=${q(taskId)}`, { method: "POST" })) };
      fill(message, notice("ok", "Cancelled."));
      render();
      // The button is gone with the unfinished state; keep the keyboard on the page, not lost.
      heading.focus();
    } catch (err) {
      fill(message, notice(err instanceof ApiError && err.status === 409 ? "info" : "error", err.message));
      e.target.disabled = false;
    }
  }

  async function loadDeliveries() {
    let data;
    try {
      data = await api(`/api/v1/webhookDeliveries?taskId=${q(taskId)}`, { signal: controller.signal });
    } catch (e) {
      if (e.name !== "AbortError") fill(deliveries, notice("error", e.message));
      return;
    }
    const list = data.deliveries ?? [];
    if (list.length === 0) {
      fill(deliveries, h("p", { class: "muted" }, "This task has no callback deliveries."));
      return;
    }
    fill(deliveries, list.map(delivery));
  }

  function delivery(d) {
    const note = h("div", { "aria-live": "polite" });
    return h(
      "article",
      { class: "delivery" },
      h("h3", {}, `${d.event} → `, h("span", { class: "mono" }, d.url)),
      h(
        "dl",
        { class: "facts" },
        h("dt", {}, "State"),
        h("dd", {}, d.state),
        h("dt", {}, "Attempts"),
        h("dd", {}, String(d.attempts)),
        d.nextAttemptTime ? [h("dt", {}, "Next attempt"), h("dd", {}, time(d.nextAttemptTime))] : null,
        d.lastError ? [h("dt", {}, "Last error"), h("dd", {}, d.lastError)] : null,
      ),
      h(
        "ol",
        { class: "attempts" },
        (d.attemptLog ?? []).map((a) =>
          h("li", {}, time(a.time), " ", a.statusCode !== undefined ? `HTTP ${a.statusCode}` : (a.error ?? "no answer"), a.latencyMs !== undefined ? ` in ${a.latencyMs} ms` : ""),
        ),
      ),
      h(
        "button",
        {
          type: "button",
          class: "secondary",
          "aria-label": `Re-deliver the ${d.event} callback to ${d.url}`,
          onclick: async (e) => {
            e.target.disabled = true;
            try {
              await api(`/api/v1/webhookDeliveries/${q(d.id)}/retry`, { method: "POST" });
              fill(note, notice("ok", "Re-delivery scheduled."));
              setTimeout(loadDeliveries, 1500);
            } catch (err) {
              fill(note, notice("error", err.message));
              e.target.disabled = false;
            }
          },
        },
        "Re-deliver",
      ),
      note,
    );
  }

  return () => {
    controller.abort();
    stopStream();
  };
}

/** A result file shown by its extension: media inline, JSON fetched and shown as text. */
function preview(url) {
  const name = decodeURIComponent(new URL(url, location.href).pathname.split("/").pop() ?? "file");
  const link = h("a", { href: url, download: name }, `Download ${name}`);
  let media = null;
  if (IMAGE.test(name)) media = h("img", { src: url, alt: `Result image ${name}`, class: "result-image" });
  else if (VIDEO.test(name)) media = h("video", { src: url, controls: true, preload: "metadata", class: "result-media" });
  else if (AUDIO.test(name)) media = h("audio", { src: url, controls: true, preload: "metadata" });
  else if (JSONFILE.test(name)) {
    media = h("pre", { class: "json" }, "Loading…");
    // Signed URLs need no key; the text goes in as text, never as markup.
    fetch(url, { cache: "no-store" })
      .then((r) => (r.ok ? r.text() : Promise.reject(new Error(`HTTP ${r.status}`))))
      .then((text) => {
        try {
          media.textContent = pretty(JSON.parse(text));
        } catch {
          media.textContent = text;
        }
      })
      .catch((e) => {
        media.textContent = `Could not load ${name}: ${e.message}`;
      });
  }
  return h("figure", { class: "result" }, media, h("figcaption", {}, link));
}

/** #/new: pick a model, edit its input (prefilled from the schema's defaults), submit. */
export function newTaskView(root) {
  const message = h("div", { "aria-live": "polite" });
  const modelSelect = h("select", { id: "n-model", name: "model", required: true });
  const help = h("div", { class: "muted schema-help" });
  const editor = h("textarea", { id: "n-input", name: "input", rows: 10, spellcheck: "false", class: "mono" });
  const submit = h("button", { type: "submit" }, "Submit task");
  let list = [];

  const form = h(
    "form",
    { class: "stack card", onsubmit: onSubmit },
    h("label", { for: "n-model" }, "Model"),
    modelSelect,
    help,
    h("label", { for: "n-input" }, "Input (JSON object)"),
    editor,
    h("p", { class: "muted" }, "Ctrl+Enter in the editor submits too."),
    submit,
    message,
  );
  editor.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) form.requestSubmit();
  });
  modelSelect.addEventListener("change", prefill);
  fill(root, h("h1", { tabindex: "-1" }, "New task"), form);

  models().then(
    (ms) => {
      list = ms;
      for (const m of ms) modelSelect.append(h("option", { value: m.model }, m.model));
      prefill();
    },
    (e) => fill(message, notice("error", e.message)),
  );

  function prefill() {
    const m = list.find((x) => x.model === modelSelect.value);
    if (!m) return;
    const props = m.inputSchema?.properties ?? {};
    const example = {};
    for (const [k, p] of Object.entries(props)) if (p && "default" in p) example[k] = p.default;
    editor.value = pretty(example);
    fill(
      help,
      m.description ? h("p", {}, m.description) : null,
      Object.keys(props).length
        ? h("ul", {}, Object.entries(props).map(([k, p]) => h("li", {}, h("code", {}, k), p?.description ? ` — ${p.description}` : "")))
        : null,
    );
  }

  async function onSubmit(e) {
    e.preventDefault();
    let input;
    try {
      input = JSON.parse(editor.value || "{}");
    } catch (err) {
      fill(message, notice("error", `The input is not valid JSON: ${err.message}`));
      editor.focus();
      return;
    }
    if (typeof input !== "object" || input === null || Array.isArray(input)) {
      fill(message, notice("error", "The input must be a JSON object."));
      return;
    }
    const model = modelSelect.value;
    submit.disabled = true;
    fill(message, notice("info", "Submitting…"));
    try {
      const data = await api(`/api/v1/generateTask/${q(model)}`, { method: "POST", body: { input } });
      rememberInput(data.taskId, input);
      noteTaskModel(data.taskId, model);
      location.hash = `#/tasks/${encodeURIComponent(data.taskId)}`;
    } catch (err) {
      fill(message, notice("error", err.message));
      submit.disabled = false;
    }
  }

  return () => {};
}
