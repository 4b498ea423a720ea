#!/usr/bin/env bash
# The whole GPU picture in one run (bench/gpu.py): bash bench/gpu.sh OUT_DIR [--smoke] [options]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && PY="${PYTHON:-.venv/bin/python}"
exec "$PY" bench/gpu.py "$@"
