#!/usr/bin/env bash
# Set up the environment, lint with ruff, and run the test suite (the README's test command).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
py="${CRNN_VENV:-$root/.venv}/bin/python"
"$py" -m ruff check .
exec "$py" -m pytest "$@"
