// Signs in to the console with the test OIDC issuer in headless Debian Chromium (playwright-core from
// tests/ui/node_modules, no downloaded browser).
//
//   node tests/oidc/drive_login.mjs <console base url> <expect: admin|refused> <screenshot path>
//
// Opens /console/login?next=/console/keys, clicks "Sign in with your organisation account" and follows the
// provider's redirects back. `admin`: the browser must end on /console/keys, signed in (the session cookie
// sent after the callback's page moved on). `refused`: it must end on the refusal page, without a session.
// Prints a JSON summary on stdout; exits 1 on any failure.
import { chromium } from "../ui/node_modules/playwright-core/index.mjs";

const [base, expect, screenshotPath] = process.argv.slice(2);
if (!base || !["admin", "refused"].includes(expect) || !screenshotPath) {
  console.error("usage: node drive_login.mjs <base url> admin|refused <screenshot path>");
  process.exit(2);
}
const WAIT_MS = Number(process.env.UI_WAIT_MS || 60000);
const summary = { ok: false, expect, visited: [] };

function check(condition, message) {
  if (!condition) throw new Error("assertion failed: " + message);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_PATH || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
});
let page;
try {
  const context = await browser.newContext();
  page = await context.newPage();
  page.setDefaultTimeout(WAIT_MS);
  page.on("framenavigated", (frame) => {
    if (frame === page.mainFrame()) summary.visited.push(new URL(frame.url()).pathname);
  });
  await page.goto(`${base}/console/login?next=/console/keys`);
  await page.click("#oidc-login");
  if (expect === "admin") {
    await page.waitForURL(`${base}/console/keys`);
    await page.waitForSelector("form.signout");
    summary.who = (await page.textContent(".who")).trim();
    summary.title = await page.title();
    check(summary.visited.includes("/console/oidc/callback"), "came back through the callback");
    const cookies = await context.cookies();
    const session = cookies.find((c) => c.name === "llmb_console");
    check(session && session.httpOnly && session.sameSite === "Strict", "an HttpOnly, SameSite=Strict session");
    check(!cookies.find((c) => c.name === "llmb_oidc_flow"), "the sign-in's cookie is gone");
    // a reload keeps the session
    await page.reload();
    await page.waitForSelector("form.signout");
  } else {
    await page.waitForURL(/\/console\/oidc\/callback/);
    await page.waitForSelector("h1");
    summary.heading = (await page.textContent("h1")).trim();
    summary.message = (await page.textContent("p.error")).trim();
    check(summary.heading === "Not an administrator", "the refusal page");
    const cookies = await context.cookies();
    check(!cookies.find((c) => c.name === "llmb_console"), "no session");
    await page.goto(`${base}/console/keys`);
    await page.waitForURL(/\/console\/login/);
  }
  await page.screenshot({ path: screenshotPath, fullPage: true });
  summary.ok = true;
} catch (error) {
  summary.error = String(error && error.stack ? error.stack : error);
  if (page) {
    summary.url = page.url();
    summary.body = (await page.content().catch(() => "")).slice(0, 2000);
  }
} finally {
  await browser.close();
}
console.log(JSON.stringify(summary));
process.exit(summary.ok ? 0 : 1);
