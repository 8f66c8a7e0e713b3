"""A delay-line wire: the fallback for delay, jitter and loss where the kernel lacks netem.

The link a <-> b becomes  a [wa]-bridge-[wb] b  inside a small "wire" namespace. In it,
br_netfilter hands each bridged IP packet to iptables FORWARD, where `-m physdev
--physdev-in wa` sends a->b packets to NFQUEUE 0 (and wb: b->a to queue 1). One
`python -m testbed.delayline` daemon per direction holds each packet for its delay and
gives the verdict (drop for loss). HTB on the wire's egress port shapes the rate.

Why here and not at the sender or the receiver: see ../shared/GUIDE.md (TCP Small Queues
at the sender; receive timestamps taken before PREROUTING at the receiver).
"""

from __future__ import annotations

import os
import sys

from testbed.daemon.control import request
from testbed.errors import TestbedError
from testbed.kernel import netns as kns
from testbed.run import run
from testbed.spec import Shaping

PORT_A, PORT_B, BRIDGE = "wa", "wb", "wire"
QUEUE = {"a_to_b": 0, "b_to_a": 1}
PHYSDEV_IN = {"a_to_b": PORT_A, "b_to_a": PORT_B}
EGRESS = {"a_to_b": PORT_B, "b_to_a": PORT_A}  # where each direction's rate is shaped


def configure(ns: str) -> None:
    """Bridge the two ports and make bridged IP traffic visit iptables (inside ns only)."""
    ipr = kns.ipr(ns)
    try:
        from testbed.kernel.link import index, set_state

        ipr.link("add", ifname=BRIDGE, kind="bridge", br_stp_state=0, br_forward_delay=0)
        for port in (PORT_A, PORT_B):
            ipr.link("set", index=index(ipr, port), master=index(ipr, BRIDGE))
            set_state(ipr, port, True)
        set_state(ipr, BRIDGE, True)
        set_state(ipr, "lo", True)
    finally:
        ipr.close()
    kns.sysctl(ns, "net.bridge.bridge-nf-call-iptables", 1)
    kns.sysctl(ns, "net.bridge.bridge-nf-call-ip6tables", 0)
    kns.sysctl(ns, "net.bridge.bridge-nf-call-arptables", 0)


def daemon_argv(direction: str, s: Shaping, control: str, ready: str, seed=None) -> list:
    argv = [sys.executable, "-m", "testbed.delayline", "--queue", str(QUEUE[direction]),
            "--delay-ms", f"{s.delay_ms:g}", "--jitter-ms", f"{s.jitter_ms:g}",
            "--loss-pct", f"{s.loss_pct:g}", "--control", control, "--ready-file", ready]
    if seed is not None:
        argv += ["--seed", str(seed)]
    return argv


def steer(ns: str, direction: str) -> None:
    """Send one direction's forwarded packets to its queue (after its daemon is bound)."""
    run(["iptables", "-w", "-A", "FORWARD", "-m", "physdev", "--physdev-in",
         PHYSDEV_IN[direction], "-j", "NFQUEUE", "--queue-num", str(QUEUE[direction])],
        netns=ns)


def control(path: str, message: dict, timeout: float = 2.0) -> dict:
    """One control message to the daemon at path, its reply (see testbed.delayline).
    TimeoutError without a reply, OSError if the daemon's socket is missing."""
    return request(path, message, timeout, what="delay line")


def set_params(path: str, s: Shaping) -> dict:
    reply = control(path, {"set": {"delay_ms": s.delay_ms, "jitter_ms": s.jitter_ms,
                                   "loss_pct": s.loss_pct}})
    if not reply.get("ok"):
        raise TestbedError(f"delay line {path}: {reply.get('error')}")
    return reply


def stats(path: str) -> dict:
    return control(path, {"stats": True})


def control_path(log_dir: str, wire_ns: str, direction: str) -> str:
    return os.path.join(log_dir, f"{wire_ns}.{direction}.sock")
