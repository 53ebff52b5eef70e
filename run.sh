#!/usr/bin/env bash
# Set up the environment (first run only) and run the whole pipeline on the embedded synthetic
# dataset. Extra flags go to run_pipeline.py (e.g. --voc12_root VOC2012 for the published run).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh runtime
exec "$PYTHON" run_pipeline.py "$@"
