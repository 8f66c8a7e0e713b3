#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian or Ubuntu machine, as root:
# the apt packages the testbed drives, and a venv (.venv) with the Python dependencies.
#
# The testbed only needs the packages' binaries: the services of the packages this run
# installs (nginx, frr, keepalived...) are not started during the install (policy-rc.d) and
# are left disabled and stopped. Packages that were installed before are not touched.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(iproute2 iputils-ping iperf3 iptables libnetfilter-queue-dev tcpdump mininet bridge-utils frr keepalived nginx
              python3-venv python3-dev build-essential procps ethtool)

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
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing Python dependencies into .venv"
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    touch "$stamp"
fi
