#!/usr/bin/env bash
# Creates (or reuses) the virtual environment and installs ovms-plugin into it.
#   scripts/setup.sh [EXTRAS]      EXTRAS: comma list of convert,test (default: none = runtime only)
# The work is scripts/setup.py's (the same on Windows and macOS): the environment lives
# outside the checkout, keyed by the dependency files, so a fresh clone (CI) reuses it;
# OVMS_PLUGIN_VENV names another place. Prints the interpreter's path last.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
exec "$py" scripts/setup.py "${1:-}"
