#!/usr/bin/env bash
# Create ./.venv (once) and install the project's requirements into it.
# Usage: source scripts/setup_env.sh [runtime|dev]
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_kind="${1:-runtime}"
_req="$_root/requirements.txt"
[ "$_kind" = dev ] && _req="$_root/requirements-dev.txt"
if [ ! -x "$_root/.venv/bin/python" ]; then
    python3 -m venv "$_root/.venv"
fi
_stamp="$_root/.venv/.installed-$_kind-$(sha1sum "$_req" "$_root/requirements.txt" | sha1sum | cut -c1-12)"
if [ ! -f "$_stamp" ]; then
    "$_root/.venv/bin/python" -m pip install --quiet --upgrade pip
    "$_root/.venv/bin/python" -m pip install --quiet -r "$_req"
    touch "$_stamp"
fi
export PYTHON="$_root/.venv/bin/python"
