#!/usr/bin/env bash
# apt-get install PACKAGE... without starting or enabling any system service, as root.
#
# The testbed only needs the packages' binaries (it runs nginx, frr, keepalived... inside
# its own namespaces), but on Debian and Ubuntu apt starts and enables a package's services
# as it installs it: a VM would get nginx on port 80 and Debian's own FRR and keepalived in
# the root namespace. So, for the duration of the install, a /usr/sbin/policy-rc.d that
# exits 101 forbids every service start (any policy-rc.d already there is put back after,
# also on failure), and afterwards the units of every package this install added (the
# dependencies it pulled in too) are disabled, and stopped where systemd runs. Packages that
# were installed before, and their services, are not touched.
set -euo pipefail

[ $# -gt 0 ] || { echo "usage: $0 PACKAGE..." >&2; exit 2; }

POLICY=/usr/sbin/policy-rc.d
SAVED=$POLICY.testbed-saved

installed_packages() {
    dpkg-query -W -f='${Package} ${Status}\n' | awk '$NF == "installed" {print $1}' | sort
}

# the unit files a package ships (templates such as foo@.service have no instance to stop)
package_units() {
    dpkg-query -L "$1" 2>/dev/null \
        | grep -E '^(/usr)?/lib/systemd/system/[^/@]+\.(service|socket|timer|path)$' \
        | xargs -r -n1 basename | sort -u
}

restore_policy() {
    if [ -e "$SAVED" ]; then mv -f "$SAVED" "$POLICY"; else rm -f "$POLICY"; fi
}

before=$(installed_packages)

# a saved one already there is the original, left by an install that was killed: keep it
if [ -e "$POLICY" ] && [ ! -e "$SAVED" ]; then mv -f "$POLICY" "$SAVED"; fi
trap restore_policy EXIT
trap 'exit 130' INT TERM HUP
printf '#!/bin/sh\n# scripts/apt-install.sh: no service starts while it installs\nexit 101\n' >"$POLICY"
chmod 755 "$POLICY"

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "$@" >/dev/null

restore_policy
trap - EXIT INT TERM HUP

new=$(comm -13 <(echo "$before") <(installed_packages))
units=()
for p in $new; do
    mapfile -t -O ${#units[@]} units < <(package_units "$p")
done
[ ${#units[@]} -gt 0 ] || exit 0

if [ -d /run/systemd/system ]; then
    # disable first, so a socket or timer cannot start the service again after the stop
    systemctl disable --quiet "${units[@]}" 2>/dev/null || true
    systemctl stop "${units[@]}" 2>/dev/null || true
    echo "apt-install: left disabled and stopped: ${units[*]}"
elif command -v systemctl >/dev/null; then
    # no systemd running (a container): nothing was started; remove the links that would
    # start the units if this machine ever boots with systemd
    systemctl disable --quiet "${units[@]}" 2>/dev/null || true
    echo "apt-install: left disabled (systemd is not running here): ${units[*]}"
fi
