#!/usr/bin/env bash
# A short first GPU call (~3 min): the new kernels, the hot path and the FlexGen peer on OPT-1.3B, CUDA parity.
# Logs under $OUT (or /tmp/probe). Each step has its own timeout; a failure does not stop the next.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/probe}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip -q install --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/flexgen-site .whl/*.whl
  export PYTHONPATH=/tmp/flexgen-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
DEV=${DEV:-cuda}
step() { local name=$1 t=$2; shift 2; echo "=== $name"; timeout "$t" "$@" >"$OUT/$name.log" 2>&1; echo "rc=$? ($name)"; tail -n "${TAIL:-15}" "$OUT/$name.log"; }
nvidia-smi -L 2>/dev/null
step checks 80 "$PY" benchmarks/gpu_checks.py
step hot 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_hot_path.py tests/test_dequant_triton.py --device "$DEV"
step bench13 75 "$PY" -c "from flexgen_lite.cli.main import main; main()" bench --model facebook/opt-1.3b --prompt-len 512 \
  --gen-len 32 --percent 100 0 100 0 100 0 --gpu-batch-size 64 --num-gpu-batches 1 --breakdown --device "$DEV"
step flexgen13 75 "$PY" benchmarks/flexgen_peer.py --model facebook/opt-1.3b --percent 100 0 100 0 100 0 \
  --gpu-batch-size 64 --num-gpu-batches 1
TAIL=25 step parity 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_parity.py tests/test_offload_features.py --device "$DEV"
