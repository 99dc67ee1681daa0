#!/usr/bin/env bash
# Installs what the browser test (tests/ui) needs; idempotent and quick when everything is there:
#   - headless Chromium from Debian (/usr/bin/chromium); no browser is ever downloaded by Playwright
#   - playwright-core from npm, exactly as package-lock.json pins it (tests/ui/node_modules)
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x /usr/bin/chromium ]; then
  echo "== installing chromium (Debian)"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update
  $SUDO apt-get install -y chromium
fi

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "node and npm are needed for tests/ui (Node 20 or newer)" >&2
  exit 1
fi

if [ ! -d node_modules/playwright-core ]; then
  echo "== npm ci (playwright-core)"
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund
fi

echo "tests/ui ready: $(/usr/bin/chromium --version 2>/dev/null), playwright-core $(node -p "require('./node_modules/playwright-core/package.json').version")"
