#!/usr/bin/env bash
# Set up the environment, lint with ruff, and run the test suite (the README's test command).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh --with-ray  # the scale-out tests run Ray
bash scripts/install_browser.sh       # the service page's test drives a headless chromium
py="${CRNN_VENV:-$root/.venv}/bin/python"
echo "== lint (ruff check)"
"$py" -m ruff check .
echo "== tests (pytest)"
exec "$py" -m pytest "$@"
