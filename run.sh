#!/usr/bin/env bash
# Set everything up (a .venv with pinned dependencies) and run the main job.
# Extra arguments go to `nemotron3 run`.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup.sh peers   # the package and the peers the report measures against (transformers)
exec .venv/bin/nemotron3 run "$@"
