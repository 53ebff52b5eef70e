#!/usr/bin/env bash
# Set up the environment (first run only) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh dev
exec "$PYTHON" -m pytest -q tests "$@"
