#!/usr/bin/env bash
# Mutation testing of one module against the tests that cover it: tools/mutate.sh nemotron3/tasks (docs/testing.md §2).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python tools/mutate.py "$@"
