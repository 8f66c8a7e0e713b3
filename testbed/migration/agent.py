"""The site agent (paper 001's PMC side): runs in a node and changes its own addresses.

    python -m testbed.migration.agent --ctl SOCK

Commands: ip_add {addr: "a.b.c.d/len", dev}, ip_del {addr, dev}, addrs {}. Each reply
carries the time the kernel change took.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
import threading
import time

from pyroute2 import IPRoute

from testbed.migration import control


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.migration.agent")
    ap.add_argument("--ctl", required=True)
    a = ap.parse_args(argv)
    ipr = IPRoute()
    lock = threading.Lock()

    def handle(msg: dict) -> dict:
        op = msg.get("op")
        with lock:
            if op == "addrs":
                return {"addrs": [f"{x.get_attr('IFA_ADDRESS')}/{x['prefixlen']}"
                                  for x in ipr.get_addr(family=2)]}
            if op in ("ip_add", "ip_del"):
                iface = ipaddress.IPv4Interface(msg["addr"])
                idx = ipr.link_lookup(ifname=msg["dev"])
                if not idx:
                    raise ValueError(f"no interface {msg['dev']!r}")
                t0 = time.perf_counter()
                ipr.addr("add" if op == "ip_add" else "del", index=idx[0],
                         address=str(iface.ip), prefixlen=iface.network.prefixlen)
                return {"took_s": time.perf_counter() - t0}
        raise ValueError(f"unknown command {op!r}")

    control.serve(a.ctl, handle)
    print("agent ready", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
