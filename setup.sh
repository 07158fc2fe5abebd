#!/usr/bin/env bash
# Sourced by run.sh and test.sh: create .venv if missing and install the pinned dependencies
# (pyproject.toml is the one place versions live). `source setup.sh test` adds the test extras.
# Re-installs only when pyproject.toml changed since the last install.
_extras="${1:-}"
_pip() {
    local out
    if ! out=$(.venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2>&1); then
        echo "$out" >&2
        echo "[setup] pip install $* failed" >&2
        exit 1
    fi
}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv" >&2
    python3 -m venv .venv
fi
_stamp=".venv/.nemotron3-installed${_extras:+-$_extras}"
if [ ! -f "$_stamp" ] || [ pyproject.toml -nt "$_stamp" ]; then
    echo "[setup] installing dependencies${_extras:+ (+$_extras)}" >&2
    # torch first and exactly pinned, so that nothing resolves a CUDA build on a CPU machine.
    _pip "$(grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')"
    if [ -n "$_extras" ]; then _pip -e ".[$_extras]"; else _pip -e .; fi
    touch "$_stamp"
fi
