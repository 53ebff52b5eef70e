#!/usr/bin/env bash
# The GPU suite in one command: bash bench/gpu_suite.sh [--out DIR] [python -m bench.gpu_suite flags]
# Uses ./.venv when it has torch, else a python3 that has torch (the GPU machine's image), else
# creates .venv (scripts/setup_env.sh). Wheels in ./.whl (e.g. pydensecrf2 for the CRF stage) are
# installed into /tmp first when present. Hard limit 480 s: the suite writes its JSON after every stage.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
    PYTHON=.venv/bin/python
elif python3 -c "import torch" 2>/dev/null; then
    PYTHON=python3
else
    source scripts/setup_env.sh runtime || exit 1
fi
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_suite_site .whl/*.whl && export PYTHONPATH="/tmp/gpu_suite_site${PYTHONPATH:+:$PYTHONPATH}"
fi
case " $* " in *" --out "*) ;; *) set -- --out "${OUT:-gpu_suite_out}" "$@" ;; esac
export PYTHONUNBUFFERED=1
exec timeout --signal=KILL 480 "$PYTHON" -m bench.gpu_suite "$@"
