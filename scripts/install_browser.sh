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
if ! command -v apt-get >/dev/null; then
  echo "install_browser.sh: no apt-get here; install chromium and chromedriver yourself" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "install_browser.sh: needs root or sudo" >&2; exit 1; }
  sudo="sudo"
fi
echo "installing chromium, chromium-driver and fonts-wqy-microhei (apt-get; a minute or two)"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver \
  fonts-wqy-microhei >/dev/null
