// Drives the operator console in headless Debian Chromium (playwright-core from tests/ui/node_modules).
//
//   node tests/console/drive.mjs <phase> <plan.json>
//
// plan.json: {"base": "...", "admin_key": "...", "shots": "<dir>", "question": "...", "key_name": "...",
//             "flaky_backend": "..."}
// Phase "pages": sign in, the overview with its charts, the request log filtered and one request opened,
// a conversation read, a key created (its secret read off the page). Phase "disable": sign in, disable the
// key, see the backends page with the cooling-down backend, sign out. Every page is screenshotted into
// `shots` (and the overview at a phone's width too). Prints a JSON summary; exits 1 on any failure.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import path from "node:path";

const require = createRequire(new URL("../ui/package.json", import.meta.url));
const { chromium } = require("playwright-core");

const [phase, planPath] = process.argv.slice(2);
if (!phase || !planPath) {
  console.error("usage: node drive.mjs <pages|disable> <plan.json>");
  process.exit(2);
}
const plan = JSON.parse(readFileSync(planPath, "utf8"));
const EXECUTABLE = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
  "--disable-component-update", "--disable-sync"];
const WAIT_MS = Number(process.env.UI_WAIT_MS || 60000);
const summary = { ok: false, phase, shots: [], console_errors: [], page_errors: [], outside: [] };

function check(condition, message) {
  if (!condition) throw new Error("assertion failed: " + message);
}

async function shot(page, name) {
  const file = path.join(plan.shots, `${phase}-${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  summary.shots.push(file);
}

async function signIn(page) {
  await page.goto(plan.base + "/console");
  check(page.url().includes("/console/login"), "no session sends the browser to the sign-in page: " + page.url());
  await shot(page, "login");
  await page.fill("#admin_key", plan.admin_key);
  await Promise.all([page.waitForURL(/\/console(\?.*)?$/), page.click("form button[type=submit]")]);
  check((await page.textContent("h1")).includes("Overview"), "signed in, the overview shows");
}

async function pagesPhase(page, context) {
  await signIn(page);
  // Overview: charts drawn from the requests the test made
  await page.goto(plan.base + "/console?range=24h");
  summary.overview = {
    charts: await page.locator("svg.chart").count(),
    request_bars: await page.locator("svg.chart-bars rect.bar, svg.chart.chart-bars rect.bar").count(),
    points: await page.locator("svg.chart circle.point").count(),
    total_requests: (await page.textContent("#total-requests .value")).trim(),
    chart_titles: await page.$$eval("svg.chart > title", (ts) => ts.map((t) => t.textContent)),
    breakdown_text: await page.textContent("section[aria-label=Breakdowns]"),
    top_callers: await page.locator("#top-callers tbody tr").count(),
  };
  await shot(page, "overview");
  // the range picker: 7 days, then the custom fields appear for "custom"
  await page.selectOption("select[name=range]", "7d");
  await Promise.all([page.waitForURL(/range=7d/), page.click("form.range button[type=submit]")]);
  summary.overview.after_7d = (await page.textContent("#total-requests .value")).trim();
  await page.selectOption("select[name=range]", "custom");
  summary.overview.custom_fields_visible = await page.locator(".custom-range input[name=since]").isVisible();
  // the same page at a phone's width: nothing wider than the screen
  const phone = await context.newPage();
  await phone.setViewportSize({ width: 390, height: 844 });
  await phone.goto(plan.base + "/console?range=24h");
  summary.phone = await phone.evaluate(() => ({
    scroll: document.documentElement.scrollWidth,
    width: window.innerWidth,
    charts: document.querySelectorAll("svg.chart").length,
  }));
  await phone.screenshot({ path: path.join(plan.shots, `${phase}-overview-phone.png`), fullPage: true });
  await phone.close();

  // Request log: filter by model and outcome, then open a request
  await page.goto(plan.base + "/console/requests");
  await shot(page, "requests");
  summary.requests_all = await page.locator("#requests tbody tr[data-request-id]").count();
  await page.fill("#request-filters input[name=model]", "mock");
  await page.selectOption("#request-filters select[name=outcome]", "ok");
  await Promise.all([page.waitForURL(/model=mock/), page.click("#request-filters button[type=submit]")]);
  summary.requests_filtered = await page.locator("#requests tbody tr[data-request-id]").count();
  summary.requests_filtered_models = await page.$$eval("#requests tbody tr[data-request-id] td:nth-child(4)",
    (tds) => [...new Set(tds.map((td) => td.textContent.trim()))]);
  await shot(page, "requests-filtered");
  await page.fill("#request-filters input[name=model]", "flaky");
  await page.selectOption("#request-filters select[name=outcome]", "");
  await Promise.all([page.waitForURL(/model=flaky/), page.click("#request-filters button[type=submit]")]);
  summary.requests_flaky = await page.$$eval("#requests tbody tr[data-request-id] td:nth-child(3)",
    (tds) => tds.map((td) => td.textContent.trim()));
  await page.fill("#request-filters input[name=model]", "mock");
  await Promise.all([page.waitForURL(/model=mock/), page.click("#request-filters button[type=submit]")]);
  await Promise.all([page.waitForURL(/\/console\/requests\/req_/),
    page.click("#requests tbody tr[data-request-id] a[href^='/console/requests/req_']")]);
  summary.request = {
    record: await page.textContent("#record"),
    timing: await page.textContent("#timing"),
    messages: await page.$$eval(".transcript .msg", (ms) => ms.map((m) => m.textContent.replace(/\s+/g, " ").trim())),
  };
  await shot(page, "request");

  // Conversations: search, open one
  await page.goto(plan.base + "/console/conversations");
  await page.fill("input[name=q]", plan.question);
  await Promise.all([page.waitForURL(/q=/), page.click("form.filters button[type=submit]")]);
  summary.conversations_found = await page.locator("#conversations tbody a").count();
  await shot(page, "conversations");
  await Promise.all([page.waitForURL(/\/console\/conversations\/.+/), page.click("#conversations tbody a")]);
  summary.conversation = await page.$$eval(".transcript .msg", (ms) =>
    ms.map((m) => ({ role: m.querySelector("h3").textContent.trim().split(" ")[0], text: m.querySelector(".content")?.textContent ?? "" })));
  summary.export_links = await page.locator("a[href*='/export?format=']").count();
  await shot(page, "conversation");

  // Keys: create one; the secret is shown once with a copy button
  await page.goto(plan.base + "/console/keys");
  await page.fill("#create-key input[name=name]", plan.key_name);
  await page.fill("#create-key input[name=models]", "mock");
  await page.fill("#create-key input[name=rpm]", "100");
  await page.fill("#create-key input[name=daily_tokens]", "100000");
  await page.fill("#create-key input[name=expires_in]", "30d");
  await Promise.all([page.waitForSelector("#secret"), page.click("#create-key button[type=submit]")]);
  summary.secret = (await page.textContent("#secret")).trim();
  summary.copy_button = await page.locator("button[data-copy='#secret']").count();
  await page.click("button[data-copy='#secret']");
  await page.waitForFunction(() => document.querySelector(".copied").textContent.length > 0);
  summary.copied_note = await page.textContent(".copied");
  await shot(page, "key-created");
  await page.goto(plan.base + "/console/keys");
  summary.keys_rows = await page.$$eval("#keys tbody tr[data-key-id]", (rows) =>
    rows.map((r) => r.textContent.replace(/\s+/g, " ").trim()));
  summary.secret_on_list = (await page.content()).includes(summary.secret);
  await shot(page, "keys");
}

async function disablePhase(page) {
  await signIn(page);
  await page.goto(plan.base + "/console/keys");
  const row = page.locator("#keys tbody tr[data-key-id]", { hasText: plan.key_name });
  check((await row.count()) === 1, "the created key is listed once");
  summary.usage_before = (await row.textContent()).replace(/\s+/g, " ").trim();
  await Promise.all([page.waitForURL(/disabled=/), row.locator("button", { hasText: "Disable" }).click()]);
  summary.status_after = (await page.locator("#keys tbody tr[data-key-id]", { hasText: plan.key_name })
    .locator(".state").textContent()).trim();
  await shot(page, "key-disabled");

  await page.goto(plan.base + "/console/backends");
  summary.backends = await page.$$eval("tr[data-backend]", (rows) =>
    rows.map((r) => ({ backend: r.dataset.backend, state: r.dataset.state, text: r.querySelector(".state").textContent.trim() })));
  await shot(page, "backends");

  // sign out: the console is closed again
  await Promise.all([page.waitForURL(/\/console\/login/), page.click("form.signout button[type=submit]")]);
  await page.goto(plan.base + "/console/keys");
  summary.after_sign_out = page.url();
}

let browser;
try {
  browser = await chromium.launch({ executablePath: EXECUTABLE, args: ARGS, timeout: 60000 });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: plan.base });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT_MS);
  page.on("console", (msg) => { if (msg.type() === "error") summary.console_errors.push(msg.text()); });
  page.on("pageerror", (err) => summary.page_errors.push(String(err)));
  page.on("request", (req) => { if (!req.url().startsWith(plan.base)) summary.outside.push(req.url()); });
  page.on("dialog", (dialog) => dialog.accept());
  if (phase === "pages") await pagesPhase(page, context);
  else if (phase === "disable") await disablePhase(page);
  else throw new Error("unknown phase " + phase);
  summary.ok = true;
} catch (err) {
  summary.error = String(err && err.stack ? err.stack : err);
} finally {
  if (browser) await browser.close().catch(() => {});
}
console.log(JSON.stringify(summary, null, 2));
process.exit(summary.ok ? 0 : 1);
