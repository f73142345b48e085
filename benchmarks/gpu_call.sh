#!/usr/bin/env bash
# One device call (docs/gpu.md, "The next GPU session"): the suite, then the two OPT-13B 4-bit rows again on the
# same machine with the suite's profile, with CUDA graphs off (FLEXGEN_LITE_CUDA_GRAPHS=0: the eager schedule, to
# weigh engine/layer_graph.py on the compressed row and the graphed step over codes on the 4-bit-in-GPU row) and,
# where a copy of an older tree was carried in .old-1205/, the compressed row at that commit (its own profile). At most 7 files under $OUT: the suite's five, eager-suite.json,
# old-1205-suite.json. Each part within its own time; the whole within 600 s (SUITE_S: 460, or 330 with the old
# tree's 150 s after it).
#
#   run(command="PYTHONUNBUFFERED=1 bash benchmarks/gpu_call.sh 2>&1 | tail -c 8000", carry=[".whl", ".old-1205"])
#   PYTHON=.venv/bin/python bash benchmarks/gpu_call.sh --cpu-smoke     # every part on tiny models, on the CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
case $PY in /*) ;; */*) PY=$PWD/$PY ;; esac  # the old tree's script runs from its own folder
SMOKE=() && [ "${1:-}" = --cpu-smoke ] && SMOKE=(--cpu-smoke)
PARITY="tests/test_parity.py tests/test_offload_features.py tests/test_gpu_hot_path.py tests/test_decode_graph.py
tests/test_decode_attention_triton.py tests/test_quantize_triton.py tests/test_shared_decode.py
tests/test_sliding_window.py tests/test_gemma3.py tests/test_window_ring.py tests/test_gpt_oss.py tests/test_moe.py
tests/test_quantized_attention.py tests/test_sink_attention.py tests/test_quantized_attention_triton.py
tests/test_int4_gemv_triton.py tests/test_block_shapes.py tests/test_row_settings.py"
ROW=opt-13b-cpu-weights-compress

SUITE_S=${SUITE_S:-$([ -d .old-1205 ] && echo 330 || echo 460)}  # a 600 s call: ~10 s of installs a part, eager 90 s
# the rows that sessions 29-31 changed first; the uncompressed OPT-13B row (link-bound at 98% twice, its twin 57 s)
# last, where it runs if time is left
ROWS=opt-1.3b-gpu-bs64,$ROW,opt-13b-4bit-gpu,llama-2-7b-cpu-cache-cpu-attn,opt-30b-16gib-auto,opt-175b-4bit-24gib
ROWS=$ROWS,opt-13b-cpu-weights,llama-2-7b-cpu-attn-and-link,llama-3-70b-4bit-24gib
bash benchmarks/gpu_suite.sh "${SMOKE[@]}" --out "$OUT" --time-limit "$SUITE_S" --rows "$ROWS" \
  --checks speed,cpu,attention,codes,matmul --parity-workers 4 --parity-tests "${PARITY//$'\n'/ }" \
  ${SMOKE:+--skip-parity --skip-checks} 2>&1 | tail -c 6000

echo "===== $ROW and opt-13b-4bit-gpu, CUDA graphs off"
FLEXGEN_LITE_CUDA_GRAPHS=0 FLEXGEN_LITE_PROFILE="$OUT/profile.json" timeout 90 bash benchmarks/gpu_suite.sh \
  "${SMOKE[@]}" --rows "$ROW,opt-13b-4bit-gpu" --skip-parity --skip-checks --no-flexgen --time-limit 80 \
  --out /tmp/gpu-call-eager 2>&1 | tail -14
cp /tmp/gpu-call-eager/gpu_suite.json "$OUT/eager-suite.json"

if [ -d .old-1205 ]; then  # PYTHONPATH at its tree: its script's pip install -e would take over this one's
  echo "===== $ROW at the 2026-12-05 commit"
  PYTHONPATH=$PWD/.old-1205 PYTHON=$PY timeout 150 bash .old-1205/benchmarks/gpu_suite.sh "${SMOKE[@]}" --rows "$ROW" \
    --skip-parity --skip-checks --no-flexgen --time-limit 140 --out /tmp/gpu-call-old 2>&1 | tail -12
  cp /tmp/gpu-call-old/gpu_suite.json "$OUT/old-1205-suite.json"
fi
ls -la "$OUT"
