#!/usr/bin/env bash
# Set everything up (a .venv with pinned dependencies) and run the main job.
# Extra arguments go to `nemotron3 run`.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup.sh ""   # explicit empty argument: do not pass our arguments on
exec .venv/bin/nemotron3 run "$@"
