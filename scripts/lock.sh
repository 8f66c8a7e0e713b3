#!/usr/bin/env bash
# Refresh requirements.lock: the exact version of every Python package .venv gets (the
# runtime dependencies of pyproject.toml, its [test] extra and its build backend,
# transitive ones included),
# resolved by uv for the Python of .venv (the machine's python3).
#
#   scripts/lock.sh             keep the pins that still fit pyproject.toml, resolve the rest
#   UPGRADE=1 scripts/lock.sh   every package to its newest version allowed by pyproject.toml
#
# uv is installed into .venv here, at the version below, never by hand.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.10
LOCK=requirements.lock
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    echo "lock: creating .venv"
    "$PY" -m venv .venv
fi
if [ "$(.venv/bin/python -m uv --version 2>/dev/null | cut -d' ' -f2)" != "$UV_VERSION" ]; then
    echo "lock: installing uv $UV_VERSION into .venv"
    .venv/bin/pip install -q "uv==$UV_VERSION"
fi

pyver=$(.venv/bin/python -c 'import platform; print(platform.python_version())')
trap 'rm -f "$LOCK.new" "$LOCK.tmp" .cache/build-system.in' EXIT
# the build backend too (setup installs the project without build isolation, from the lock)
mkdir -p .cache
sed -n 's/^requires = \[\(.*\)\]/\1/p' pyproject.toml | tr -d '" ' | tr ',' '\n' >.cache/build-system.in
args=(pip compile pyproject.toml .cache/build-system.in --extra test --python .venv/bin/python
      --no-header --quiet --output-file "$LOCK.new")
[ "${UPGRADE:-0}" = 1 ] && args+=(--upgrade)
# uv keeps the pins of an existing output file unless told to upgrade: start from the lock
[ -f "$LOCK" ] && grep -v '^#' "$LOCK" >"$LOCK.new"
.venv/bin/python -m uv "${args[@]}"

{
    echo "# Exact versions of every Python package .venv gets: the dependencies of pyproject.toml,"
    echo "# its [test] extra and its build backend. For Python ${pyver%.*} on $(uname -s) $(uname -m)"
    echo "# (made with Python $pyver by 'make lock': scripts/lock.sh, uv $UV_VERSION)."
    echo "# 'make setup' installs from it; 'make lock UPGRADE=1' moves every pin to its newest."
    echo "# python: ${pyver%.*}"
    cat "$LOCK.new"
} >"$LOCK.tmp"
mv "$LOCK.tmp" "$LOCK"
echo "lock: $LOCK has $(grep -c '^[A-Za-z0-9]' "$LOCK") packages for Python ${pyver%.*}"
