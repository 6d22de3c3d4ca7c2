#!/usr/bin/env bash
# Build the dynamic-shape Ascend model with ATC; same options as `python -m convert.atc`.
# Example: scripts/atc.sh --model nano_fixed.onnx --output om/nano --soc_version Ascend310P3
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
exec "${CRNN_VENV:-$root/.venv}/bin/python" -m convert.atc "$@"
