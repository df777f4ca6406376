// The dashboard in a real browser: Debian's chromium, driven by playwright-core.
//
// Env: BASE_URL (the server, e.g. http://127.0.0.1:PORT), API_KEY (a client key), SCREENSHOT_DIR
// (where the two screenshots go), CHROMIUM (default /usr/bin/chromium).
// Exits 0 when every check passed; otherwise prints what failed and exits 1.
// Run by crates/taskgate/tests/it/dashboard.rs, which starts the server.

import { mkdtemp, mkdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const BASE = mustEnv("BASE_URL").replace(/\/$/, "");
const KEY = mustEnv("API_KEY");
const SHOTS = mustEnv("SCREENSHOT_DIR");
const ORIGIN = new URL(BASE).origin;
// What demo-image is asked to draw; its PNG is exactly this size.
const IMAGE = { width: 320, height: 200 };

function mustEnv(name) {
  const v = process.env[name];
  if (!v) {
    console.error(`${name} must be set`);
    process.exit(2);
  }
  return v;
}

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
  console.log(`ok - ${what}`);
}

// A hung browser must not hang the test suite.
const watchdog = setTimeout(() => {
  console.error("the browser test did not finish within 180 s");
  process.exit(1);
}, 180_000);

await mkdir(SHOTS, { recursive: true });
const profile = await mkdtemp(join(tmpdir(), "taskgate-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
  viewport: { width: 1280, height: 900 },
  colorScheme: "light",
});

// Every request any page makes; anything outside the server's origin fails the test.
const requests = [];
const foreign = [];
context.on("request", (r) => {
  const url = r.url();
  requests.push(`${r.method()} ${url}`);
  let origin;
  try {
    origin = new URL(url).origin;
  } catch {
    origin = "invalid";
  }
  if (origin !== ORIGIN) foreign.push(url);
});
const problems = [];

const page = context.pages()[0] ?? (await context.newPage());
page.setDefaultTimeout(30_000);
page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
page.on("console", (m) => {
  // CSP violations are reported on the console; the page must cause none.
  if (m.type() === "error" && /Content Security Policy|Refused to/i.test(m.text())) problems.push(`console: ${m.text()}`);
});

let failed = false;
try {
  await run();
} catch (e) {
  failed = true;
  console.error(`FAILED: ${e.stack || e}`);
  try {
    await page.screenshot({ path: join(SHOTS, "failure.png"), fullPage: true });
    console.error(`page at failure (${page.url()}); screenshot: ${join(SHOTS, "failure.png")}`);
    console.error((await page.evaluate(() => document.body.innerText)).slice(0, 4000));
  } catch {
    // The page is gone; the error above says why.
  }
}
if (foreign.length > 0) {
  failed = true;
  console.error(`FAILED: requests outside ${ORIGIN}:\n  ${foreign.join("\n  ")}`);
} else {
  console.log(`ok - all ${requests.length} requests went to ${ORIGIN}`);
}
if (problems.length > 0) {
  failed = true;
  console.error(`FAILED: ${problems.join("\n")}`);
}
await context.close();
await rm(profile, { recursive: true, force: true });
clearTimeout(watchdog);
process.exit(failed ? 1 : 0);

async function run() {
  // Sign-in: a wrong key shows the server's message; the right one opens the dashboard.
  const resp = await page.goto(`${BASE}/dashboard`);
  check(resp.status() === 200, "GET /dashboard answers 200");
  const csp = resp.headers()["content-security-policy"] ?? "";
  check(csp.includes("default-src 'none'") && csp.includes("script-src 'self'"), "the page carries the strict CSP");
  await page.fill("#signin-key", "tg_not_a_real_key");
  await page.press("#signin-key", "Enter");
  const refusal = page.locator("#signin-message .notice-error");
  await refusal.waitFor();
  check(/key/i.test(await refusal.textContent()), `a wrong key shows the server's message: "${await refusal.textContent()}"`);
  await page.fill("#signin-key", KEY);
  await page.press("#signin-key", "Enter");
  await page.locator("h1", { hasText: "Tasks" }).waitFor();
  check(!page.url().includes(KEY), "the key is not in the URL");
  check((await page.evaluate(() => sessionStorage.getItem("taskgate.apiKey"))) === KEY, "the key is kept in sessionStorage");

  // Live counts arrive over the SSE stream.
  await page.locator("#counts-state", { hasText: "(live)" }).waitFor();
  const count = (model, state) =>
    page.evaluate(
      ([m, s]) => Number(document.querySelector(`#counts-body td[data-model="${m}"][data-state="${s}"]`)?.textContent ?? 0),
      [model, state],
    );
  const successBefore = await count("*", "success");

  // A demo-image task submitted from the page reaches success with its image shown.
  const imageTask = await submitFromPage("demo-image", { prompt: "a red fox", ...IMAGE });
  await page.locator('#task-state [data-state="success"]').waitFor();
  const img = page.locator("img.result-image");
  await img.waitFor();
  await page.waitForFunction(() => {
    const i = document.querySelector("img.result-image");
    return i && i.complete && i.naturalWidth > 0;
  });
  const size = await img.evaluate((i) => ({ width: i.naturalWidth, height: i.naturalHeight }));
  check(size.width === IMAGE.width && size.height === IMAGE.height, `the image preview is rendered at its natural size ${size.width}x${size.height}`);
  await page.locator('.timeline li[data-step="final"]', { hasText: "Succeeded" }).waitFor();
  const shownInput = JSON.parse(await page.locator("#task-input").textContent());
  check(shownInput.prompt === "a red fox" && shownInput.width === IMAGE.width, "the task page shows the task's input");
  const logLines = await page.locator(".logs li").allTextContents();
  check(logLines.length >= 1 && new Set(logLines).size === logLines.length, `the log list has no repeats (${logLines.length} lines)`);
  await page.screenshot({ path: join(SHOTS, "dashboard-task.png"), fullPage: true });

  // The live counts follow.
  await page.waitForFunction(
    (before) => Number(document.querySelector('#counts-body td[data-model="*"][data-state="success"]')?.textContent ?? 0) > before,
    successBefore,
  );
  check((await count("demo-image", "success")) >= 1, "the live counts show the finished demo-image task");

  // A JSON result file is fetched and shown pretty-printed, as text.
  await submitFromPage("echo", { prompt: "hello json" });
  await page.locator('#task-state [data-state="success"]').waitFor();
  const json = page.locator(".result pre.json");
  await page.waitForFunction(() => document.querySelector(".result pre.json")?.textContent.includes("hello json"));
  check((await json.textContent()).includes('\n  "prompt": "hello json"'), "a JSON result is shown pretty-printed");

  // A slow echo task is cancelled from its page and fails with CANCELLED.
  await submitFromPage("echo", { delay_ms: 600000 });
  await page.locator("#task-cancel").click();
  await page.locator('#task-state [data-state="failed"]').waitFor();
  check((await page.locator("#task-failcode").textContent()).trim() === "CANCELLED", "the cancelled task failed with CANCELLED");
  await page.locator('.timeline li[data-step="final"]', { hasText: "CANCELLED" }).waitFor();
  check((await page.locator('.timeline li[data-step="attempt"]').count()) >= 1, "the timeline lists the cancelled task's attempt");

  // Another one is cancelled from the table.
  const slow = await submitFromPage("echo", { delay_ms: 600000, note: "cancelled from the table" });
  await page.click('nav a[href="#/tasks"]');
  const row = page.locator(`tr[data-task="${slow}"]`);
  await row.locator("button", { hasText: "Cancel" }).click();
  await row.locator('[data-state="failed"]').waitFor();
  check((await row.locator(".failcode").textContent()).trim() === "CANCELLED", "a task cancelled from the table shows CANCELLED");

  // Filters: state=success lists the image task and not the cancelled ones.
  await page.selectOption("#f-state", "success");
  await page.locator(`tr[data-task="${slow}"]`).waitFor({ state: "detached" });
  await page.locator(`tr[data-task="${imageTask}"]`).waitFor();
  const states = await page.$$eval("table.tasks tbody .badge", (bs) => bs.map((b) => b.dataset.state));
  check(states.length >= 1 && states.every((s) => s === "success"), `the state filter lists only successful tasks (${states.join(", ")})`);
  await page.selectOption("#f-state", "");
  await page.locator(`tr[data-task="${slow}"]`).waitFor();
  // The counts catch up with both cancels (they are sent at most once a second).
  await page.waitForFunction(
    () =>
      Number(document.querySelector('#counts-body td[data-model="*"][data-state="failed"]')?.textContent) === 2 &&
      Number(document.querySelector('#counts-body td[data-model="*"][data-state="processing"]')?.textContent) === 0,
  );
  check(true, "the live counts show both cancelled tasks as failed");
  await page.screenshot({ path: join(SHOTS, "dashboard-tasks.png"), fullPage: true });

  // Search by id: an unknown id says so; a known one opens its page.
  await page.fill("#f-task", "task_0000000000000000000000000z");
  await page.press("#f-task", "Enter");
  await page.locator(".search .notice-error", { hasText: "No task with id" }).waitFor();
  check(true, "searching an unknown id says it was not found");
  await page.fill("#f-task", imageTask);
  await page.press("#f-task", "Enter");
  await page.waitForURL(`**/dashboard#/tasks/${imageTask}`);
  await page.locator('#task-state [data-state="success"]').waitFor();
  check(true, "searching a known id opens its task page");

  // The operator view.
  await page.click('nav a[href="#/operator"]');
  await page.locator('[data-backlog="pending"]').waitFor();
  check(true, "the operator view shows the webhook backlog");

  // 375 px wide: nothing scrolls sideways, on the list and on a task page.
  await page.setViewportSize({ width: 375, height: 800 });
  // Each view is measured once what it loads is in (the streams never let the network idle).
  const loaded = {
    "#/tasks": `tr[data-task="${imageTask}"]`,
    [`#/tasks/${imageTask}`]: "img.result-image",
    "#/new": "#n-model option",
    "#/operator": '[data-backlog="pending"]',
  };
  for (const [hash, selector] of Object.entries(loaded)) {
    await page.evaluate((h) => (location.hash = h), hash);
    await page.locator("#view h1").first().waitFor();
    await page.locator(selector).first().waitFor({ state: "attached" });
    await page.waitForFunction(() => [...document.images].every((i) => i.complete));
    const width = await page.evaluate(() => document.documentElement.scrollWidth);
    check(width <= 375, `at 375 px, ${hash} is ${width} px wide (no horizontal scroll)`);
  }
  await page.setViewportSize({ width: 1280, height: 900 });

  // Sign-out forgets the key.
  await page.click("#signout");
  await page.locator("#signin-key").waitFor();
  check((await page.evaluate(() => sessionStorage.getItem("taskgate.apiKey"))) === null, "signing out removes the key");
}

/** Opens New task, submits `input` to `model`, waits for the task page; returns the task id. */
async function submitFromPage(model, input) {
  await page.click('nav a[href="#/new"]');
  await page.locator("#n-model option", { hasText: model }).first().waitFor({ state: "attached" });
  await page.selectOption("#n-model", model);
  await page.fill("#n-input", JSON.stringify(input, null, 2));
  await page.click("text=Submit task");
  await page.waitForURL(/#\/tasks\/task_[0-9a-z]+$/);
  const id = decodeURIComponent(page.url().split("#/tasks/")[1]);
  await page.locator("#task-state").waitFor();
  console.log(`   submitted ${model} task ${id}`);
  return id;
}
