#!/usr/bin/env bash
# The demo, start to finish on a CPU (make demo, make demo-full): tools/run_demo.py does the work;
# its docstring lists the key=value arguments, the DEMO_* variables and the exit statuses.
#   bash launch/run_demo.sh [key=value ...]
#   DEMO_CONFIG=configs/demo_full.yaml bash launch/run_demo.sh [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python tools/run_demo.py "$@"
