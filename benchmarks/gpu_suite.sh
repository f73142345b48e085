#!/usr/bin/env bash
# The prepared GPU check of issue 12: CUDA parity tests, then FlexGen's headline workloads, in one run under
# 8 minutes (benchmarks/gpu_suite.py says what each step does; --help lists the options).
#
# For a machine that has python3 with torch (CUDA), transformers, safetensors and numpy but no registry. It installs
# the project (pip install --no-deps -e ., or PYTHONPATH if that fails) and any wheels in $WHEELS (default .whl/),
# then runs benchmarks/gpu_suite.py with the arguments given. Results go to --out DIR, else $OUT, else a temp dir.
#
#   bash benchmarks/gpu_suite.sh                     # everything, on CUDA, within 470 s
#   bash benchmarks/gpu_suite.sh --rows 'opt-13b*' --skip-parity --time-limit 300
#   PYTHON=.venv/bin/python bash benchmarks/gpu_suite.sh --cpu-smoke     # tiny models on the CPU, < 60 s
#
# Wheels. The suite itself needs numpy, scipy (the policy search) and pytest (+ hypothesis for the whole test
# suite); gguf only for the GGUF tests. Build the folder where pip can reach a registry, for the GPU machine's
# Python (3.12 on this workplace's H200 image, which already has scipy, hypothesis and pytest):
#   echo /.whl/ >> .git/info/exclude      # .gitignore already ignores it here
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl gguf==0.19.0          # add scipy==1.17.1 hypothesis==6.170.17 where the image lacks them
# and carry .whl with the run. Wheels go to /tmp/flexgen-site (on PYTHONPATH), leaving the image's packages alone.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
pip_quiet() { "$PY" -m pip -q --disable-pip-version-check --no-input "$@"; }

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  pip_quiet install --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/flexgen-site \
    "$WHEELS"/*.whl || { echo "installing the wheels in $WHEELS failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/flexgen-site${PYTHONPATH:+:$PYTHONPATH}
fi

# installed from this checkout? (checked from / so that the current directory does not answer for it)
here=$(pwd -P)
if ! (cd / && "$PY" -c "import flexgen_lite, os, sys; sys.exit(not flexgen_lite.__file__.startswith('$here/'))") \
    2>/dev/null; then
  if ! log=$(pip_quiet install --no-index --no-deps --no-build-isolation -e . 2>&1); then
    echo "pip install -e . failed (${log##*$'\n'}): using PYTHONPATH=$here" >&2
  fi
fi
export PYTHONPATH=$here${PYTHONPATH:+:$PYTHONPATH}
exec "$PY" benchmarks/gpu_suite.py "$@"
