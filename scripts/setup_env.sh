#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install requirements.txt into it;
# with --with-ray (or CRNN_WITH_RAY=1) also requirements-ray.txt (Ray Data, optional).
# Usage: bash scripts/setup_env.sh [--with-ray]   (idempotent)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CRNN_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
files=("$root/requirements.txt")
case "${1:-}" in
  --with-ray) CRNN_WITH_RAY=1 ;;
  "") ;;
  *) echo "setup_env.sh: unknown option $1 (only --with-ray)" >&2; exit 2 ;;
esac
[ "${CRNN_WITH_RAY:-0}" = 1 ] && files+=("$root/requirements-ray.txt")
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
for file in "${files[@]}"; do
  name="$(basename "$file" .txt)"
  stamp="$venv/.$name.sha256"  # one stamp per file: installing one never redoes the other
  want="$(sha256sum "$file" | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "installing $name.txt into $venv (first run only; a minute or two)"
    # -qq: errors only (pip's index warnings are noise here); a failure still stops the script.
    "$venv/bin/python" -m pip install -qq --disable-pip-version-check -r "$file"
    echo "$want" > "$stamp"
  fi
done
