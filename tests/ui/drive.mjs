// Drives tests/ui/chat.html in headless Debian Chromium (playwright-core, no downloaded browser).
//
//   node tests/ui/drive.mjs <page url> <screenshot path>
//
// The page URL carries ?base=<API>&key=<key>. Two turns are sent; each reply must stream in (text visible
// while the reply is still streaming), complete with [DONE] and quote the question. The page must have sent
// the whole history each turn, with no page or console errors. Prints a JSON summary on stdout; exits 1 on
// any failure (printing the page's console errors), 2 on bad usage.
import { chromium } from "playwright-core";

const [pageUrl, screenshotPath] = process.argv.slice(2);
if (!pageUrl || !screenshotPath) {
  console.error("usage: node drive.mjs <page url> <screenshot path>");
  process.exit(2);
}

const EXECUTABLE = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
const WAIT_MS = Number(process.env.UI_WAIT_MS || 60000);
const TURNS = [
  { question: "Hello there", expect: "You said: Hello there" },
  { question: "And a second question", expect: "You said: And a second question" },
];

const consoleErrors = [];
const pageErrors = [];
const failedRequests = [];
const chatRequests = [];
const apiResponses = [];
const preflights = [];
const summary = { ok: false, page: pageUrl, screenshot: screenshotPath, browser: null };
const started = Date.now();

function check(condition, message) {
  if (!condition) throw new Error("assertion failed: " + message);
}

async function transcript(page) {
  return page.$$eval("#transcript .msg", (nodes) =>
    nodes.map((n) => ({
      role: n.dataset.role,
      content: n.querySelector(".content").textContent,
      complete: n.dataset.complete ?? null,
      chunks: Number(n.dataset.chunks || 0),
    })),
  );
}

let browser;
let page;
try {
  // launch() gives every run a fresh temporary profile (user-data-dir) and deletes it on close
  browser = await chromium.launch({ executablePath: EXECUTABLE, args: ARGS, timeout: 60000 });
  summary.browser = browser.version();
  const context = await browser.newContext({ viewport: { width: 1000, height: 720 } });
  page = await context.newPage();
  page.setDefaultTimeout(WAIT_MS);

  page.on("console", (msg) => {
    if (msg.type() === "error") {
      const where = msg.location()?.url;
      consoleErrors.push(where ? `${msg.text()} (${where})` : msg.text());
    }
  });
  page.on("pageerror", (err) => pageErrors.push(String(err)));
  page.on("requestfailed", (req) =>
    failedRequests.push(`${req.method()} ${req.url()}: ${req.failure()?.errorText}`),
  );
  page.on("request", (req) => {
    if (req.url().endsWith("/v1/chat/completions") && req.method() === "POST") {
      chatRequests.push(JSON.parse(req.postData() || "{}"));
    }
  });
  page.on("response", async (res) => {
    const url = res.url();
    if (url.includes("/v1/")) {
      apiResponses.push({
        url,
        method: res.request().method(),
        status: res.status(),
        allowOrigin: (await res.allHeaders())["access-control-allow-origin"] ?? null,
      });
    }
  });
  // CORS preflights are not Playwright requests; the DevTools protocol shows them
  const cdp = await context.newCDPSession(page);
  await cdp.send("Network.enable");
  cdp.on("Network.requestWillBeSent", (e) => {
    if (e.request.method === "OPTIONS") preflights.push(e.request.url);
  });

  await page.goto(pageUrl, { waitUntil: "load" });
  const pageOrigin = new URL(page.url()).origin;
  const apiOrigin = new URL(new URL(pageUrl).searchParams.get("base")).origin;
  check(pageOrigin !== apiOrigin, `page (${pageOrigin}) and API (${apiOrigin}) must be different origins`);

  // the model picker is filled from GET /v1/models
  await page.waitForSelector("body[data-state='ready'], body[data-state='error']");
  check((await page.getAttribute("body", "data-state")) === "ready", "the model list did not load");
  summary.models = await page.$$eval("#model option", (opts) => opts.map((o) => o.value));
  check(summary.models.length > 0, "no models in the picker");

  summary.turns = [];
  for (const [i, turn] of TURNS.entries()) {
    const t0 = Date.now();
    await page.fill("#input", turn.question);
    await page.click("#send");
    // streaming: part of the reply is on screen while the bubble is still marked as streaming
    // (or the page already shows an error: then fail fast, below, with the page's messages)
    const partialHandle = await page.waitForFunction(() => {
      const node = document.querySelector("#transcript .msg.assistant.streaming .content");
      if (node !== null && node.textContent.length > 0) return { text: node.textContent };
      return Number(document.body.dataset.errors) > 0 ? { text: null } : false;
    });
    const partial = (await partialHandle.jsonValue()).text;
    const firstText = Date.now() - t0;
    await page.waitForFunction(
      (n) => document.body.dataset.turns === String(n) || Number(document.body.dataset.errors) > 0,
      i + 1,
    );
    await page.waitForSelector("body[data-state='ready']");
    const errors = await page.$$eval("#errors li", (items) => items.map((li) => li.textContent));
    check(errors.length === 0, "the page shows errors: " + JSON.stringify(errors));
    const msgs = await transcript(page);
    check(msgs.length === 2 * (i + 1), `expected ${2 * (i + 1)} messages, got ${msgs.length}`);
    const reply = msgs[msgs.length - 1];
    check(msgs[msgs.length - 2].role === "user" && msgs[msgs.length - 2].content === turn.question,
      "the question is not in the transcript");
    check(reply.role === "assistant" && reply.complete === "true", "the reply did not complete");
    check(reply.content.includes(turn.expect), `reply ${JSON.stringify(reply.content)} lacks ${turn.expect}`);
    check(reply.chunks > 1, `the reply came in ${reply.chunks} chunk(s), not streamed`);
    check(reply.content.startsWith(partial) && partial.length < reply.content.length,
      `no partial reply was on screen while streaming (saw ${JSON.stringify(partial)})`);
    summary.turns.push({
      question: turn.question,
      reply: reply.content,
      chunks: reply.chunks,
      partial_seen: partial,
      first_text_ms: firstText,
      total_ms: Date.now() - t0,
    });
  }

  // the page resent the whole history each turn, the way ChatGPT-style UIs do
  check(chatRequests.length === TURNS.length, `expected ${TURNS.length} chat requests, got ${chatRequests.length}`);
  const roles = chatRequests.map((body) => body.messages.map((m) => m.role).join(","));
  check(roles[0] === "user" && roles[1] === "user,assistant,user", "history not resent: " + JSON.stringify(roles));
  check(chatRequests.every((body) => body.stream === true), "a request was not streamed");
  const final = await transcript(page);
  check(
    JSON.stringify(chatRequests[1].messages) ===
      JSON.stringify(final.slice(0, 3).map((m) => ({ role: m.role, content: m.content }))),
    "the second request's history differs from the transcript",
  );
  check(apiResponses.length >= 3, "expected at least 3 API responses");
  check(apiResponses.every((r) => r.status === 200 && r.allowOrigin), "API responses without CORS: " +
    JSON.stringify(apiResponses));
  check(preflights.length >= 1, "no CORS preflight (OPTIONS) was seen");
  check(pageErrors.length === 0, "page errors: " + JSON.stringify(pageErrors));
  check(consoleErrors.length === 0, "console errors: " + JSON.stringify(consoleErrors));
  check(failedRequests.length === 0, "failed requests: " + JSON.stringify(failedRequests));

  await page.screenshot({ path: screenshotPath, fullPage: true });
  summary.messages = final.map((m) => ({ role: m.role, content: m.content }));
  summary.requests = chatRequests.map((body) => ({ model: body.model, messages: body.messages.length }));
  summary.api_responses = apiResponses;
  summary.preflights = preflights.length;
  summary.ok = true;
} catch (err) {
  summary.error = String(err && err.stack ? err.stack : err);
  if (page) {
    await page.screenshot({ path: screenshotPath, fullPage: true }).catch(() => {});
    summary.transcript = await transcript(page).catch(() => null);
  }
} finally {
  summary.console_errors = consoleErrors;
  summary.page_errors = pageErrors;
  summary.failed_requests = failedRequests;
  summary.elapsed_ms = Date.now() - started;
  if (browser) await browser.close().catch(() => {});
}

console.log(JSON.stringify(summary, null, 2));
if (!summary.ok) {
  console.error("UI test FAILED: " + summary.error);
  for (const line of consoleErrors) console.error("  console error: " + line);
  for (const line of pageErrors) console.error("  page error: " + line);
  process.exit(1);
}
