#!/usr/bin/env bash
# Creates (or reuses) the virtual environment and installs ovms-plugin into it.
#   scripts/setup.sh [EXTRAS]      EXTRAS: comma list of convert,test (default: none = runtime only)
# The environment lives outside the checkout, keyed by the dependency files, so a fresh clone
# (CI) reuses it; OVMS_PLUGIN_VENV names another place. Prints the interpreter's path last.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
key=$( { cat pyproject.toml constraints.txt; echo "$extras"; "$py" --version; } | sha256sum | cut -c1-16)
venv="${OVMS_PLUGIN_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/ovms-plugin/venvs/$key}"
if [ ! -f "$venv/.complete" ]; then
  echo "setting up $venv (extras: ${extras:-none})" >&2
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip setuptools wheel >&2
  spec="."
  [ -n "$extras" ] && spec=".[$extras]"
  # The constraints keep the CPU torch (see constraints.txt) and the OpenVINO release together.
  "$venv/bin/pip" install -q -c constraints.txt "$spec" >&2
  # optimum-intel drags in a CUDA torchvision that cannot import on CPU torch, and nothing
  # we run needs it.
  "$venv/bin/pip" uninstall -q -y torchvision >&2 2>/dev/null || true
  touch "$venv/.complete"
fi
# Point the environment at this checkout (cheap; the dependencies are already there).
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e . >&2
echo "$venv/bin/python"
