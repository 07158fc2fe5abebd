#!/usr/bin/env bash
# Set everything up (a .venv with pinned dependencies) and run the test suite.
# Extra arguments go to pytest, e.g. `./test.sh -m slow` or `./test.sh tests/config/test_config.py`.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup.sh test
exec .venv/bin/python -m pytest "$@"
