#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install requirements.txt into it.
# Usage: source scripts/setup_env.sh   (or run it; it is idempotent)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CRNN_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$root/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing requirements.txt into $venv (first run only; about a minute)"
  # -qq: errors only (pip's index warnings are noise here); a failure still stops the script.
  "$venv/bin/python" -m pip install -qq --disable-pip-version-check -r "$root/requirements.txt"
  echo "$want" > "$stamp"
fi
