#!/usr/bin/env bash
# Sets everything up and runs the checks and the tests: the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
python=$(bash scripts/setup.sh convert,test)
"$python" -m ruff check ovms_plugin tests scripts benchmarks
"$python" -m pytest -q -ra --durations=15 "$@"
