#!/usr/bin/env bash
# Sets everything up and runs the main job on the built-in default model (made offline).
set -euo pipefail
cd "$(dirname "$0")/.."
python=$(bash scripts/setup.sh convert)
exec "$python" -m ovms_plugin demo "$@"
