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
# The end-to-end test opens the results page in a real headless browser.
if [ "$_kind" = dev ] && ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing Debian's chromium for the browser test of the results page" >&2
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "warning: no chromium on PATH; install it (Debian package 'chromium') for the browser test" >&2
    fi
fi
export PYTHON="$_root/.venv/bin/python"
