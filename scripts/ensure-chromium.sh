#!/usr/bin/env bash
# The HTML report test opens report.html in headless Chromium; Playwright's own browser download does not work
# offline, so the test drives Debian's chromium. Install it when missing and we are allowed to.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian chromium for the report test (apt-get)..."
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
  echo "chromium is missing: install it (Debian: apt-get install chromium) or set SURGVQA_CHROMIUM=/path/to/chromium" >&2
  exit 1
fi
