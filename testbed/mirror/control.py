"""Driving the mirror on a testbed Network: start the DR daemon, run syncs from the primary
(each after a heartbeat, skipped with an alert if the peer does not answer), and fail over
the virtual host to the DR site by one of the paper's three methods.

Every command runs inside the nodes' namespaces (node.run / node.start); nothing here
touches the root namespace.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Callable, Optional

from testbed.mirror import wire
from testbed.mirror.daemon import MirrorError
from testbed.process import listening

log = logging.getLogger("testbed.mirror.control")
METHODS = ("garp", "mac", "expiry")
SKIPPED = 3  # exit code of `sync` when the heartbeat failed


def start_receiver(node, mirror_path: str, port: int = wire.DEFAULT_PORT,
                   idle_timeout: float = 5.0, size: Optional[int] = None):
    argv = [sys.executable, "-m", "testbed.mirror", "serve", "--mirror", mirror_path,
            "--port", str(port), "--idle-timeout", f"{idle_timeout:g}"]
    if size is not None:
        argv += ["--size", str(size)]
    return node.start(argv, name=f"mirror-serve{port}", ready=listening(node.ns, port))


def sync_argv(volume: str, peer: str, port: int = wire.DEFAULT_PORT, block_size: int = 65536,
              mode: str = "block", rate_mbit: Optional[float] = None, timeout: float = 5.0,
              heartbeat: bool = True) -> list:
    argv = [sys.executable, "-m", "testbed.mirror", "sync", "--volume", volume, "--peer", peer,
            "--port", str(port), "--block-size", str(block_size), "--mode", mode,
            "--timeout", f"{timeout:g}"]
    if rate_mbit:
        argv += ["--rate-mbit", f"{rate_mbit:g}"]
    if not heartbeat:
        argv.append("--no-heartbeat")
    return argv


def parse_stats(text: str) -> dict:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise MirrorError(f"sync printed no counters: {text.strip()[-200:]}")


def run_sync(node, volume: str, peer: str, timeout_s: float = 600, **opts) -> dict:
    """One sync from node; returns the sender's counters, raises MirrorError (its one-line
    reason) on refusal or failure, and on a skipped sync (heartbeat failed)."""
    res = node.run(sync_argv(volume, peer, **opts), timeout=timeout_s, check=False)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise MirrorError(("skipped: " if res.returncode == SKIPPED else "") + last)
    return parse_stats(res.stdout)


class Controller:
    """The paper's cron job: before each sync, check the peer; log; alert and skip on error."""

    def __init__(self, node, volume: str, peer: str, port: int = wire.DEFAULT_PORT,
                 alert: Optional[Callable[[str], None]] = None, **sync_opts):
        self.node, self.volume, self.peer, self.port = node, volume, peer, port
        self.alert = alert or (lambda msg: log.error(msg))
        self.opts = sync_opts
        self.history: list = []

    def heartbeat(self, timeout: float = 2.0) -> Optional[dict]:
        res = self.node.run([sys.executable, "-m", "testbed.mirror", "status", "--peer",
                             self.peer, "--port", str(self.port)], timeout=timeout + 10,
                            check=False)
        if res.returncode != 0:
            self.alert(f"ALERT heartbeat: mirror peer {self.peer}:{self.port} unreachable: "
                       f"{res.stderr.strip()[-200:]}")
            return None
        return json.loads(res.stdout)

    def cycle(self) -> Optional[dict]:
        """Heartbeat, then sync; None (and an alert) if either fails. Never raises."""
        st = self.heartbeat()
        if st is None:
            self.history.append({"t": time.time(), "result": "skipped"})
            return None
        if st["state"] != "idle":
            self.alert(f"ALERT mirror peer {self.peer} is {st['state']}: sync skipped")
            self.history.append({"t": time.time(), "result": "skipped"})
            return None
        try:
            stats = run_sync(self.node, self.volume, self.peer, port=self.port,
                             heartbeat=False, **self.opts)
        except MirrorError as e:
            self.alert(f"ALERT sync to {self.peer} failed: {e}")
            self.history.append({"t": time.time(), "result": "failed", "error": str(e)})
            return None
        log.info("sync to %s: %d blocks, %.2f s", self.peer, stats["blocks_sent"],
                 stats["transfer_s"])
        self.history.append({"t": time.time(), "result": "ok", **stats})
        return stats


def promote(node, port: int = wire.DEFAULT_PORT) -> str:
    """Make the DR node's mirror read-write (through its daemon); returns its manifest."""
    res = node.run([sys.executable, "-m", "testbed.mirror", "promote", "--peer", "127.0.0.1",
                    "--port", str(port)], check=False)
    if res.returncode != 0:
        raise MirrorError(f"promote failed: {res.stderr.strip()[-200:]}")
    return res.stdout.strip()


def add_vip(node, vip: str, ifname: str, prefix: int = 24) -> None:
    node.run(["ip", "addr", "add", f"{vip}/{prefix}", "dev", ifname])


def move_host(node, vip: str, ifname: str, method: str, old_mac: Optional[str] = None,
              prefix: int = 24, garp_count: int = 3) -> None:
    """Take over the virtual host at node: the VIP as an alias of ifname, and then
    'garp': gratuitous ARP replies; 'mac': take over the old host's MAC (clients' caches
    stay right); 'expiry': nothing, clients find out when their ARP entry expires."""
    if method not in METHODS:
        raise MirrorError(f"failover method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "mac":
        if not old_mac:
            raise MirrorError("failover by MAC move needs the old host's MAC")
        node.run(["ip", "link", "set", "dev", ifname, "address", old_mac])
    add_vip(node, vip, ifname, prefix)
    if method == "garp":
        node.garp(vip, ifname, count=garp_count, interval_s=0.1, kind="reply")
