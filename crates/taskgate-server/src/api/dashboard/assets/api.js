// The API client: the key, the envelope, and nothing else. The key lives in sessionStorage (gone
// when the tab closes) and travels only in the Authorization header, never in a URL.

const KEY = "taskgate.apiKey";

export function getKey() {
  return sessionStorage.getItem(KEY);
}

export function setKey(key) {
  sessionStorage.setItem(KEY, key);
}

export function clearKey() {
  sessionStorage.removeItem(KEY);
  sessionStorage.removeItem(INPUTS);
}

/** A refusal in the envelope: the server's own message, its status and errorCode. */
export class ApiError extends Error {
  constructor(status, message, errorCode) {
    super(message);
    this.status = status;
    this.errorCode = errorCode;
  }
}

/** Called with the error when the server answers 401: the key is no longer good. */
let onUnauthorized = () => {};
export function whenUnauthorized(fn) {
  onUnauthorized = fn;
}

export function authHeaders(key = getKey()) {
  return { Authorization: `Bearer ${key}` };
}

/**
 * One request; resolves to the envelope's `data`, or throws an ApiError carrying the server's
 * message. `key` overrides the stored one (sign-in checks a key before keeping it).
 */
export async function api(path, { method = "GET", body, key, signal } = {}) {
  const headers = authHeaders(key);
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let resp;
  try {
    resp = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, `the server could not be reached (${e.message})`, "network");
  }
  let envelope;
  try {
    envelope = await resp.json();
  } catch {
    throw new ApiError(resp.status, `the server answered ${resp.status} without a JSON body`, "bad_response");
  }
  if (!resp.ok) {
    const err = new ApiError(resp.status, envelope.message || `HTTP ${resp.status}`, envelope.data?.errorCode);
    if (resp.status === 401 && key === undefined) onUnauthorized(err);
    throw err;
  }
  return envelope.data;
}

export const q = encodeURIComponent;

// Inputs submitted from this tab, by task id: the task page's fallback when the server does not
// answer `statusTask …&input=true` with `data.input` (a server from before that field).
const INPUTS = "taskgate.inputs";
const MAX_INPUTS = 50;

export function rememberInput(taskId, input) {
  const all = readInputs();
  all.push([taskId, input]);
  sessionStorage.setItem(INPUTS, JSON.stringify(all.slice(-MAX_INPUTS)));
}

export function recallInput(taskId) {
  const hit = readInputs().find(([id]) => id === taskId);
  return hit ? hit[1] : undefined;
}

function readInputs() {
  try {
    const v = JSON.parse(sessionStorage.getItem(INPUTS) || "[]");
    return Array.isArray(v) ? v : [];
  } catch {
    return [];
  }
}

// Models of tasks seen in lists, so a task page opened from the table needs no search.
const taskModels = new Map();
export function noteTaskModel(taskId, model) {
  taskModels.set(taskId, model);
}
export function knownTaskModel(taskId) {
  return taskModels.get(taskId);
}

let modelsPromise;
/** GET /api/v1/models, once per sign-in. */
export function models() {
  modelsPromise ??= api("/api/v1/models").then((d) => d.models, (e) => {
    modelsPromise = undefined;
    throw e;
  });
  return modelsPromise;
}
export function forgetModels() {
  modelsPromise = undefined;
}

/**
 * Finds which model a task belongs to by asking statusTask under each model (a task of another
 * model answers 404). Resolves to {model, status}, or undefined when no model has it.
 */
export async function findTask(taskId) {
  const known = knownTaskModel(taskId);
  const names = (await models()).map((m) => m.model);
  const order = known ? [known, ...names.filter((n) => n !== known)] : names;
  for (const model of order) {
    try {
      const status = await api(`/api/v1/statusTask/${q(model)}?taskId=${q(taskId)}`);
      noteTaskModel(taskId, model);
      return { model, status };
    } catch (e) {
      if (!(e instanceof ApiError) || e.status !== 404) throw e;
    }
  }
  return undefined;
}

export const FINAL = new Set(["success", "failed"]);
