#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian or Ubuntu machine, as root:
# the apt packages the testbed drives, and a venv (.venv) with the Python dependencies at
# the exact versions of requirements.lock (then the project itself, editable).
#
# The testbed only needs the packages' binaries: the services of the packages this run
# installs (nginx, frr, keepalived...) are not started during the install (policy-rc.d) and
# are left disabled and stopped. Packages that were installed before are not touched.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(iproute2 iputils-ping iperf3 iptables libnetfilter-queue-dev tcpdump mininet bridge-utils frr keepalived nginx
              python3-venv python3-dev build-essential procps ethtool)
LOCK=requirements.lock

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: must run as root (try: sudo make setup)" >&2
    exit 1
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing apt packages: ${missing[*]}"
    bash scripts/apt-install.sh "${missing[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
stamp=.venv/.testbed-installed
want=$(cat "$LOCK" pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing the Python dependencies of $LOCK into .venv"
    locked=$(sed -n 's/^# python: //p' "$LOCK")
    have=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [ "$locked" != "$have" ]; then
        echo "setup: note: $LOCK was made for Python $locked, .venv has $have" \
             "(the same versions are installed; run 'make lock' to resolve for $have)"
    fi
    .venv/bin/pip install -q -r "$LOCK"
    # built with the lock's setuptools (no build isolation: nothing unpinned is fetched)
    PYTHONWARNINGS=ignore .venv/bin/pip install -q --no-deps --no-build-isolation -e .
    echo "$want" >"$stamp"
fi
