"""The site agent (paper 001's PMC side): runs in a node and changes its own addresses.

    python -m testbed.migration.agent --ctl SOCK

Commands: ip_add {addr: "a.b.c.d/len", dev}, ip_del {addr, dev}, addrs {}. Each reply
carries the time the kernel change took. TERM or INT end it (exit 0, the socket removed).
"""

from __future__ import annotations

import ipaddress
import signal
import sys
import threading
import time

from pyroute2 import IPRoute

from testbed import daemon
from testbed.migration import control

NAME = "migration.agent"


def handler(ipr: IPRoute):
    """handle(msg) -> reply for the control socket (one command at a time)."""
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

    return handle


def body(argv) -> int:
    ap = daemon.ArgParser(NAME, description="A site's agent: changes the node's addresses "
                                            "on command.")
    ap.add_argument("--ctl", required=True, help="the control socket's path")
    a = ap.parse_args(argv)
    ipr = IPRoute()
    server = control.serve(a.ctl, handler(ipr))
    daemon.raise_stop_on_signals()
    try:
        print("agent ready", flush=True)
        while True:
            signal.pause()
    except daemon.Stop:
        return 0
    finally:
        server.close()
        ipr.close()


def main(argv=None) -> int:
    return daemon.run_main(NAME, body, argv)


if __name__ == "__main__":
    sys.exit(main())
