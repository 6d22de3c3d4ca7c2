#!/usr/bin/env bash
# The main job, end to end, on a fresh clone: environment, weights, export, rewrite, ATC
# command, int8 quantisation, inference and scoring. Chains the project's CLIs; holds no logic.
#
# Usage: scripts/run_e2e.sh [--backend onnxruntime|torch|ais_bench] [--width-policy fixed|keep-ratio]
#                           [--precision int8|fp32] [--lstm int8|fp32] [--data LMDB]
#                           [--calibration LMDB] [--synthetic]
#                           [--output DIR] [--soc-version Ascend310P3] [--device N] [--two-step]
# Data: --data, else $IIIT5K_LMDB, else ../shared/data/IIIT5K_3000; a path that does not exist
# is an error. --synthetic scores (and calibrates on) generated words instead, labelled SYNTHETIC.
# ONNX Runtime runs the int8 model (convert.quantize) by default, calibrated on --calibration,
# else $IIIT5K_CALIB_LMDB, else ../shared/data/IIIT5K_train_500; --precision fp32 skips it.
# Its LSTM is int8 too (--lstm int8, ONNX Runtime's dynamic quantisation: about 18 % less engine
# time; a sample's text then depends on its batch, which both flows build alike); --lstm fp32
# keeps it float (convert.quantize's default, what a service batching requests should run).
# Scoring runs in one process from the lmdb (eval.postprocess --test-dir); --two-step runs the
# ModelZoo flow instead (preprocess.parse_testdata to .npy files, then eval.postprocess).
# Relative paths are taken from the folder you run the script in.
set -euo pipefail
caller="$PWD"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

backend=onnxruntime
policy=""
precision=int8
lstm=int8
calibration="${IIIT5K_CALIB_LMDB:-$root/../shared/data/IIIT5K_train_500}"
data="${IIIT5K_LMDB:-$root/../shared/data/IIIT5K_3000}"
output="$root/results/$(date +%Y%m%d-%H%M%S)"
soc="${SOC_VERSION:-Ascend310P3}"
device=0
two_step=""
synthetic=""
usage() { echo "$1 (see --help)" >&2; exit 2; }
value() { [ $# -ge 2 ] && [ -n "$2" ] && [ "${2#--}" = "$2" ] || usage "$1 needs a value"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --backend|--width-policy|--data|--precision|--lstm|--calibration|--output|--soc-version|--device)
      value "$@" ;;&
    --backend) backend="$2"; shift 2 ;;
    --width-policy) policy="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    --precision) precision="$2"; shift 2 ;;
    --lstm) lstm="$2"; shift 2 ;;
    --calibration) calibration="$2"; shift 2 ;;
    --output) output="$2"; shift 2 ;;
    --soc-version) soc="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --two-step) two_step=1; shift ;;
    --synthetic) synthetic=1; shift ;;
    -h|--help) sed -n '2,19s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) usage "unknown option: $1" ;;
  esac
done
case "$backend" in onnxruntime|torch|ais_bench) ;; *) usage "unknown backend: $backend" ;; esac
case "$precision" in int8|fp32) ;; *) usage "unknown precision: $precision (int8 or fp32)" ;; esac
case "$lstm" in int8|fp32) ;; *) usage "unknown LSTM precision: $lstm (int8 or fp32)" ;; esac
absolute() { case "$1" in /*) realpath -m "$1" ;; *) realpath -m "$caller/$1" ;; esac; }
data="$(absolute "$data")"
calibration="$(absolute "$calibration")"
output="$(absolute "$output")"
quantise=""
[ "$backend" = onnxruntime ] && [ "$precision" = int8 ] && quantise=1
if [ -z "$synthetic" ]; then
  [ -f "$data/data.mdb" ] || { echo "error: $data: no lmdb there (data.mdb); give --data LMDB or --synthetic" >&2; exit 1; }
  if [ -n "$quantise" ] && [ ! -f "$calibration/data.mdb" ]; then
    echo "error: $calibration: no calibration lmdb there; give --calibration LMDB, --precision fp32 or --synthetic" >&2
    exit 1
  fi
fi
if [ "$backend" = ais_bench ] && ! command -v atc >/dev/null 2>&1; then
  echo "error: --backend ais_bench needs atc (CANN) and an NPU; atc is not on PATH" >&2
  exit 1
fi
cd "$root"

echo "== environment"
bash scripts/setup_env.sh
py="${CRNN_VENV:-$root/.venv}/bin/python"
work="$output/work"
mkdir -p "$work"

echo "== weights"
weights="$("$py" -m models.weights fetch nano-ocr)"

om_args=()
if [ "$backend" != torch ]; then
  echo "== export (convert.pth2onnx) and rewrite for ATC (convert.fix)"
  "$py" -m convert.pth2onnx "$weights" "$work/nano.onnx" --arch nano-ocr
  "$py" -m convert.fix "$work/nano.onnx" "$work/nano_fixed.onnx"

  echo "== ATC (convert.atc)"
  if command -v atc >/dev/null 2>&1; then
    "$py" -m convert.atc --model "$work/nano_fixed.onnx" --output "$work/om/nano" --soc-version "$soc"
    om_args=(--om-path "$(ls "$work"/om/nano*.om | head -n 1)" --device "$device")
  else
    "$py" -m convert.atc --model "$work/nano_fixed.onnx" --output "$work/om/nano" --soc-version "$soc" --dry-run
    echo "atc is not on PATH (no CANN here): the command above is what would build the .om;"
    echo "inference continues on ONNX Runtime with ${quantise:+an int8 copy of }the rewritten model."
  fi
fi

if [ -n "$synthetic" ]; then
  echo "== --synthetic: generating SYNTHETIC word lmdbs"
  data="$work/synthetic_lmdb"
  "$py" -m preprocess.make_synthetic_lmdb "$data" --samples 200
  calibration="$work/synthetic_calibration"
  [ -n "$quantise" ] && "$py" -m preprocess.make_synthetic_lmdb "$calibration" --samples 200 --seed 1
fi

onnx_model="$work/nano_fixed.onnx"
if [ -n "$quantise" ]; then
  echo "== int8 for ONNX Runtime CPU (convert.quantize), calibrated on $calibration"
  "$py" -m convert.quantize "$work/nano_fixed.onnx" "$work/nano_int8.onnx" --calibration "$calibration" \
    --lstm "$lstm"
  onnx_model="$work/nano_int8.onnx"
fi

policy_args=()
[ -n "$policy" ] && policy_args=(--width-policy "$policy")
case "$backend" in
  onnxruntime) model_args=(--onnx-path "$onnx_model") ;;
  torch) model_args=(--pth "$weights" --arch nano-ocr) ;;
  ais_bench) model_args=("${om_args[@]}") ;;
esac
outputs=(--report "$output/report.json" --predictions "$output/predictions.csv")
if [ -n "$two_step" ]; then
  echo "== preprocess (preprocess.parse_testdata) $data"
  "$py" -m preprocess.parse_testdata --test-dir "$data" --output-npy "$work/inputs" \
    --arch nano-ocr "${policy_args[@]}"
  echo "== inference and scoring (eval.postprocess, backend $backend)"
  "$py" -m eval.postprocess --input-npy "$work/inputs" "${model_args[@]}" "${outputs[@]}" \
    | tee "$output/summary.txt"
else
  echo "== read, infer and score in one process (eval.postprocess --test-dir, backend $backend) $data"
  "$py" -m eval.postprocess --test-dir "$data" "${model_args[@]}" "${policy_args[@]}" \
    "${outputs[@]}" | tee "$output/summary.txt"
fi

echo "== results in $output (report.json, predictions.csv)"
if [ -n "$synthetic" ]; then
  echo "NOTE: these figures are SYNTHETIC (rendered words), not IIIT5K; drop --synthetic for real ones."
fi
