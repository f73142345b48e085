#!/usr/bin/env bash
# The prepared GPU run of issues 12 and 22: CUDA parity, then FlexGen's headline workloads beside the original
# FlexGen, within one 10-minute run (benchmarks/gpu_suite.py says what each step does; --help lists the options).
#
# For a machine that has python3 with torch (CUDA), transformers, tokenizers, safetensors, numpy, scipy, attrs,
# tqdm and pytest but no registry. It installs the wheels in $WHEELS (default .whl/) into /tmp/flexgen-site (on
# PYTHONPATH, the image's packages left alone), the project (pip install --no-deps -e ., or PYTHONPATH if that
# fails), then runs benchmarks/gpu_suite.py with the arguments given. Results go to --out DIR, else $OUT, else a
# temp dir: gpu_suite.json, gpu_suite.md, gpu_suite.log, traces.tar.gz, profile.json.
#
#   bash benchmarks/gpu_suite.sh                     # everything that fits, on CUDA, within 480 s
#   bash benchmarks/gpu_suite.sh --rows 'opt-13b*' --skip-parity --time-limit 300
#   PYTHON=.venv/bin/python bash benchmarks/gpu_suite.sh --cpu-smoke     # tiny models on the CPU, < 90 s
#
# Wheels (docs/gpu.md): the original FlexGen, pure Python, for the peer rows (its pulp requirement is only for
# its cost model, which flex_opt does not import). Build the folder where pip can reach a registry:
#   echo /.whl/ >> .git/info/exclude      # .gitignore already ignores it here
#   python3 -m pip download --no-deps -d .whl flexgen==0.1.8
#   # for the GPU machine's Python (3.12), where its image lacks them: add gguf==0.19.0 scipy==1.17.1 with
#   #   --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64
# and carry .whl with the run. Without the wheel the FlexGen twins are recorded as skipped, with the reason.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
pip_quiet() { "$PY" -m pip -q --disable-pip-version-check --no-input "$@"; }

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  pip_quiet install --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/flexgen-site \
    "$WHEELS"/*.whl || echo "installing the wheels in $WHEELS failed: going on without them" >&2
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
