#!/usr/bin/env bash
# Install the headless browser the service page's test drives: Debian's chromium and its
# chromedriver (and a CJK font, so Chinese texts render). Does nothing when both are there.
# Needs root (or sudo) and apt-get; elsewhere install a chromium and its matching driver
# yourself and put them on PATH (tests/serve/test_page.py finds them there).
# Usage: bash scripts/install_browser.sh
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
bash "$(dirname "$0")/apt_install.sh" install_browser.sh chromium chromium-driver \
  fonts-wqy-microhei
