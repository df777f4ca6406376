// Server-Sent Events over fetch(). EventSource cannot send an Authorization header, and the key
// must never go into a URL, so the stream is read from fetch()'s body and parsed here
// (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation).

import { ApiError, authHeaders } from "./api.js";

/**
 * Reads one stream until it ends. Calls onEvent(type, data, id) for each event (`type` defaults
 * to "message"; `data` is the JSON-decoded data, or the text when it is not JSON). Resolves when
 * the server ends the stream; rejects with an ApiError when it refuses it.
 */
export async function readSse(path, { onEvent, onOpen, signal, lastEventId }) {
  const headers = { ...authHeaders(), Accept: "text/event-stream" };
  if (lastEventId) headers["Last-Event-ID"] = lastEventId;
  const resp = await fetch(path, { headers, signal, cache: "no-store" });
  if (!resp.ok) {
    let message = `HTTP ${resp.status}`;
    let code;
    try {
      const env = await resp.json();
      message = env.message || message;
      code = env.data?.errorCode;
    } catch {
      // Not the envelope: the status says enough.
    }
    throw new ApiError(resp.status, message, code);
  }
  onOpen?.();
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let type = "";
  let data = [];
  let id = lastEventId;
  const dispatch = () => {
    if (data.length > 0) {
      const text = data.join("\n");
      let value = text;
      try {
        value = JSON.parse(text);
      } catch {
        // Leave it as text.
      }
      onEvent(type || "message", value, id);
    }
    type = "";
    data = [];
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    // Lines end in \n, \r\n or \r; a trailing \r may be the first half of \r\n, so keep it.
    const lines = buffer.split(/\r\n|\n|\r(?!$)/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line === "") {
        dispatch();
      } else if (line.startsWith(":")) {
        // A comment: the server's heartbeat.
      } else {
        const colon = line.indexOf(":");
        const field = colon === -1 ? line : line.slice(0, colon);
        let val = colon === -1 ? "" : line.slice(colon + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (field === "event") type = val;
        else if (field === "data") data.push(val);
        else if (field === "id") id = val;
      }
    }
  }
}

/**
 * Keeps a stream open: reconnects after an error or an unexpected end, waiting 1 s, 2 s, 4 s …
 * up to 30 s (reset once a connection opens). `shouldReconnect()` says whether an end is
 * unexpected (a task's stream ends by design after its final event). Returns a function that
 * stops it. `onState("open" | "retrying", error?)` reports the connection's state.
 */
export function liveSse(path, { onEvent, onState, shouldReconnect = () => true }) {
  const controller = new AbortController();
  let delay = 1000;
  let lastId;
  (async () => {
    while (!controller.signal.aborted) {
      let error;
      try {
        await readSse(path, {
          signal: controller.signal,
          lastEventId: lastId,
          onOpen: () => {
            delay = 1000;
            onState?.("open");
          },
          onEvent: (type, data, id) => {
            lastId = id;
            onEvent(type, data);
          },
        });
      } catch (e) {
        if (controller.signal.aborted) return;
        error = e;
        // A refused key or a missing endpoint will not get better by retrying quickly.
        if (e instanceof ApiError && e.status >= 400 && e.status < 500) delay = Math.max(delay, 15000);
      }
      if (controller.signal.aborted || (!error && !shouldReconnect())) return;
      onState?.("retrying", error);
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 30000);
    }
  })();
  return () => controller.abort();
}
