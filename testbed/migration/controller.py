"""Paper 001's migration controller (the MCS): the 11 steps of Table 1 on a gmpls_dr network.

    with Network(gmpls_dr.build()) as net:
        mc = MigrationController(net, gmpls_dr, image_mb=40)
        mc.setup()                      # sites' agents, the streamer on main, the player
        steps = mc.migrate(bod=True)    # main -> backup, 11 timestamped steps
        report = mc.finish()            # stream end: hashes, stalls, FIN/RST capture

Steps: 1 start (the target's restore daemon ready); 2 reserve bandwidth (the BoD links up
at bod_mbit); 3 configure the migration VLAN on l2sw; 4 freeze the streamer; 5 migrate it
(TCP_REPAIR dump + memory image over the BoD path, else the public path); 6 move the virtual
IP (agents: delete on the source, add on the target); 7 move the user's port at the access
gateway to the target's VLAN; 8 resume (the target rebuilds the socket and streams on);
9 delete the bandwidth; 10 delete the VLAN; 11 report. Without BoD steps 2, 3, 9, 10 are
skipped (as in the paper). Network steps are the controller's own netlink requests (the
paper's CP devices, L2SW and NAGW); process and address steps are commands to the agents
and streamers inside the site namespaces.

The controller knows the network's addresses and VLANs from the topology module the caller
passes (topologies.gmpls_dr: see Layout); the library never imports topologies/.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass

from testbed.errors import SpecError, TestbedError
from testbed.measure.tcpstream import pattern
from testbed.migration import control
from testbed.poll import wait_until
from testbed.process import log_matches

STEPS = {1: "start", 2: "reserve bandwidth (BoD)", 3: "configure migration VLAN",
         4: "freeze process", 5: "migrate process", 6: "move virtual IP",
         7: "switch user VLAN", 8: "resume", 9: "delete bandwidth", 10: "delete VLAN",
         11: "report"}
BOD_ONLY = (2, 3, 9, 10)
SITES = ("main", "backup")


@dataclass(frozen=True)
class Layout:
    """What the controller needs to know of the DR network, from the module that built it
    (Layout.of(topologies.gmpls_dr)): addresses as "a.b.c.d/len", pairs as (main, backup)."""
    service_ip: str       # the virtual IP, on main's service port at first
    service_mac: str      # given to both sites' service ports
    public: tuple         # the sites' addresses on the public path
    bod: tuple            # and on the BoD path
    vlan_main: int        # the access gateway's VLAN of each site (step 7)
    vlan_backup: int
    vlan_migration: int   # l2sw: the VLAN that joins the BoD ports (step 3)
    park_main: int        # and the parking VLANs that keep them apart (step 10)
    park_backup: int

    NAMES = ("SERVICE_IP", "SERVICE_MAC", "PUBLIC", "BOD", "VLAN_MAIN", "VLAN_BACKUP",
             "VLAN_MIGRATION", "PARK_MAIN", "PARK_BACKUP")

    @classmethod
    def of(cls, topology) -> "Layout":
        """From a topology module's constants (SERVICE_IP, ..., PARK_BACKUP: NAMES)."""
        missing = [n for n in cls.NAMES if not hasattr(topology, n)]
        if missing:
            raise SpecError(f"migration: the topology {getattr(topology, '__name__', topology)}"
                            f" lacks {missing[0]} (use topologies.gmpls_dr)")
        return cls(*(getattr(topology, n) for n in cls.NAMES))


class MigrationFailed(TestbedError):
    """Step 5 failed: the original server resumed; .steps holds what was done."""

    def __init__(self, msg: str, steps: list):
        super().__init__(msg)
        self.steps = steps


def _stream_hash(n: int) -> str:
    h = hashlib.sha256()
    for off in range(0, n, 1 << 20):
        h.update(pattern(off, min(1 << 20, n - off)))
    return h.hexdigest()


class MigrationController:
    def __init__(self, net, topology, port: int = 9200, mport: int = 9300,
                 rate_mbit: float = 2.0, seconds: float = 60.0, burst_s: float = 30.0,
                 image_mb: float = 40.0, buffer_s: float = 30.0, bod_mbit: float = 1000.0,
                 capture: bool = True, dirty_mbps: float = 0.0):
        """net: a network built by topology (the module, topologies.gmpls_dr, or a Layout)."""
        for name, v in (("rate_mbit", rate_mbit), ("seconds", seconds), ("image_mb", image_mb),
                        ("buffer_s", buffer_s), ("bod_mbit", bod_mbit)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise SpecError(f"migration: {name} must be positive, got {v!r}")
        if burst_s < 0:
            raise SpecError(f"migration: burst_s must be >= 0, got {burst_s!r}")
        if isinstance(dirty_mbps, bool) or not isinstance(dirty_mbps, (int, float)) \
                or dirty_mbps < 0:
            raise SpecError(f"migration: dirty_mbps must be >= 0, got {dirty_mbps!r}")
        self.layout = topology if isinstance(topology, Layout) else Layout.of(topology)
        self.dirty_mbps = dirty_mbps
        missing = [n for n in ("user", "agw", "l2sw") + SITES if n not in net.nodes]
        if missing:
            raise SpecError(f"migration: the network lacks {missing[0]!r} (use "
                            f"topologies.gmpls_dr)")
        self.net = net
        self.port, self.mport = port, mport
        self.rate_mbit, self.seconds, self.burst_s = rate_mbit, seconds, burst_s
        self.image_mb, self.buffer_s, self.bod_mbit = image_mb, buffer_s, bod_mbit
        self.capture = capture
        self.site = "main"  # where the stream is served now
        self.generation = 0
        self.streamers: list = []  # (site, proc, ctl, out)
        self.history: list = []  # one list of steps per migration
        self.dir = net.log_dir

    # paths and helpers -----------------------------------------------------------------
    def _ctl(self, what: str) -> str:
        return os.path.join(self.dir, f"mig-{what}.sock")

    @property
    def service_ip(self) -> str:
        return self.layout.service_ip

    def _bod_links(self) -> list:
        return [self.net.link(s, "l2sw") for s in SITES]

    def setup(self) -> None:
        """Step 0: same MAC on both sites' service ports, the BoD path down, agents on both
        sites, the streamer on main, tcpdump and the player on the user."""
        me = [sys.executable, "-m"]
        for s in SITES:
            node = self.net[s]
            node.run(["ip", "link", "set", "dev", f"{s}-svc", "address",
                      self.layout.service_mac])
            ctl = self._ctl(f"agent-{s}")
            node.start(me + ["testbed.migration.agent", "--ctl", ctl], name="agent",
                       ready=lambda c=ctl: os.path.exists(c))
        for ln in self._bod_links():
            ln.set(up=False)
        ip = self.service_ip.split("/")[0]
        self._start_streamer("main", ["serve", "--bind", ip, "--port", str(self.port),
                                      "--rate-mbit", str(self.rate_mbit),
                                      "--seconds", str(self.seconds),
                                      "--burst-s", str(self.burst_s),
                                      "--image-mb", str(self.image_mb),
                                      "--dirty-mbps", str(self.dirty_mbps)],
                             ready="streamer listening")
        user = self.net["user"]
        if self.capture:
            self.cap = user.start(["tcpdump", "-i", "user-eth0", "-n", "-l", "-tt",
                                   f"tcp port {self.port} and (tcp[13] & 5 != 0)"],
                                  name="tcpdump")
            self.cap.wait_ready(log_matches(lambda: self.cap, "listening on"), timeout=15)
        self.player_out = os.path.join(self.dir, "player.json")
        self.player = user.start(me + ["testbed.migration.player", "--dst", ip, "--port",
                                       str(self.port), "--out", self.player_out,
                                       "--rate-mbit", str(self.rate_mbit),
                                       "--buffer-s", str(self.buffer_s)], name="player")
        self.player.wait_ready(log_matches(lambda: self.player, "connected"), timeout=15)
        proc = self.streamers[-1][1]
        proc.wait_ready(log_matches(lambda: proc, "streaming to"), timeout=15)

    def _start_streamer(self, site: str, args: list, ready: str):
        self.generation += 1
        tag = f"{site}{self.generation}"
        ctl, out = self._ctl(f"streamer-{tag}"), os.path.join(self.dir, f"streamer-{tag}.json")
        p = self.net[site].start([sys.executable, "-m", "testbed.migration.streamer"] + args
                                 + ["--ctl", ctl, "--out", out], name=f"streamer{self.generation}")
        p.wait_ready(log_matches(lambda: p, ready), timeout=30)
        self.streamers.append((site, p, ctl, out))
        return ctl

    def status(self) -> dict:
        """The serving streamer's {offset, frozen, migrated, connected, ...}."""
        return control.request(self.streamers[-1][2], op="status")

    def wait_offset(self, n: int, timeout: float = 30.0) -> int:
        """Wait until the stream has sent n bytes (e.g. the player's initial buffer)."""
        def reached():
            off = self.status()["offset"]
            return (off,) if off >= n else None  # a tuple: an offset of 0 is an answer too

        return wait_until(reached, timeout, f"the stream to send {n} bytes")[0]

    # the sequence ----------------------------------------------------------------------
    def migrate(self, bod: bool = True, fault: str = "", timeout_s: float = None,
                precopy: bool = False, stop_bytes: int = 1 << 20, max_rounds: int = 30) -> list:
        """Move the stream from the current site to the other; returns the steps as dicts
        {step, name, t_start, t_end, duration_s, ...}; step 11 holds suspension_s (freeze
        to resumed). MigrationFailed if step 5 fails (the source resumed; the BoD path and
        VLAN are released).

        precopy=True (paper 003's live migration): step 5 copies the memory image while the
        stream runs, then rounds of the pages written meanwhile until at most stop_bytes
        are left (or max_rounds), and only then freezes (step 4 happens inside step 5)."""
        if precopy and fault:
            raise SpecError("migration: fault injection is for stop-and-copy only")
        if not isinstance(stop_bytes, int) or stop_bytes < 0 or not isinstance(
                max_rounds, int) or max_rounds < 0:
            raise SpecError("migration: stop_bytes and max_rounds must be whole numbers >= 0")
        g = self.layout
        if fault not in ("", "corrupt", "truncate"):
            raise SpecError(f"migration: fault must be '', 'corrupt' or 'truncate', got "
                            f"{fault!r}")
        if timeout_s is not None and not (isinstance(timeout_s, (int, float))
                                          and timeout_s > 0):
            raise SpecError(f"migration: timeout_s must be positive, got {timeout_s!r}")
        if not self.streamers:
            raise TestbedError("migration: call setup() first")
        src = self.site
        dst = "backup" if src == "main" else "main"
        src_ctl = self.streamers[-1][2]
        steps: list = []
        t_seq = time.time()

        def step(n: int, fn):
            t0 = time.time()
            extra = dict(fn() or {})
            extra.pop("ok", None)
            t1 = time.time()
            steps.append({"step": n, "name": STEPS[n], "t_start": t0, "t_end": t1,
                          "duration_s": t1 - t0, "since_start_s": t1 - t_seq, **extra})
            return extra

        path_ip = (g.bod if bod else g.public)[SITES.index(dst)].split("/")[0]
        if timeout_s is None:  # generous: 4x the physical floor of the path, at least 10 s
            rate = self.bod_mbit if bod else self.net.link("main", "backup").shaping[
                "a_to_b"].rate_mbit
            timeout_s = max(10.0, 4 * self.image_mb * 8 / rate)

        def start():
            ctl = self._start_streamer(dst, ["restore", "--listen", "0.0.0.0",
                                             "--mport", str(self.mport)],
                                       ready="restore listening")
            return {"target_ctl": ctl}

        dst_ctl = step(1, start)["target_ctl"]

        def reserve():
            for ln in self._bod_links():
                ln.set(up=True, rate_mbit=self.bod_mbit)
            sw = self.net.switch("l2sw")
            self._wait_up([("main", "main-bod"), ("backup", "backup-bod"),
                           ("l2sw", sw.port("main")), ("l2sw", sw.port("backup"))])

        def vlan_on():
            sw = self.net.switch("l2sw")
            return {"apply_s": sum(sw.set_vlan(s, g.vlan_migration) for s in SITES)}

        def bod_off():
            for ln in self._bod_links():
                ln.set(up=False)

        def vlan_off():
            sw = self.net.switch("l2sw")
            return {"apply_s": sw.set_vlan("main", g.park_main)
                    + sw.set_vlan("backup", g.park_backup)}

        if bod:
            step(2, reserve)
            step(3, vlan_on)
        if not precopy:
            step(4, lambda: control.request(src_ctl, op="freeze"))
        try:
            r = step(5, lambda: control.request(src_ctl, timeout=10 * timeout_s + 30,
                                                op="migrate", host=path_ip, port=self.mport,
                                                timeout_s=timeout_s, fault=fault,
                                                precopy=precopy, stop_bytes=stop_bytes,
                                                max_rounds=max_rounds))
            if precopy:
                tf = r["t_freeze"]
                steps.insert(-1, {"step": 4, "name": STEPS[4], "t_start": tf, "t_end": tf,
                                  "duration_s": 0.0, "since_start_s": tf - t_seq,
                                  "inside_step5": True})
        except control.ControlError as e:
            steps.append({"step": 5, "name": STEPS[5], "failed": str(e),
                          "t_start": steps[-1]["t_end"], "t_end": time.time()})
            if bod:
                step(9, bod_off)
                step(10, vlan_off)
            site, proc, _, _ = self.streamers.pop()  # the unused restore daemon
            proc.stop()
            self.history.append(steps)
            raise MigrationFailed(f"step 5 failed, {src} resumed: {e}", steps) from None
        step(6, lambda: self._move_ip(src, dst))
        agw = self.net.switch("agw")
        step(7, lambda: {"apply_s": agw.set_vlan("user", g.vlan_main if dst == "main"
                                                 else g.vlan_backup)})
        res = step(8, lambda: control.request(dst_ctl, op="resume"))
        if bod:
            step(9, bod_off)
            step(10, vlan_off)
        t_frozen = next(x["t_start"] for x in steps if x["step"] == 4)
        suspension = next(x["t_end"] for x in steps if x["step"] == 8) - t_frozen
        step(11, lambda: {"image_bytes": r["bytes"], "transfer_s": r["transfer_s"],
                          "suspension_s": suspension,
                          "rounds": r.get("rounds"),
                          "dump_s": r["dump_s"], "restore_s": res["restore_s"],
                          "offset": res["offset"], "local": res["local"],
                          "remote": res["remote"]})
        self.site = dst
        self.history.append(steps)
        return steps

    def _move_ip(self, src: str, dst: str) -> dict:
        a = control.request(self._ctl(f"agent-{src}"), op="ip_del", addr=self.service_ip,
                            dev=f"{src}-svc")
        b = control.request(self._ctl(f"agent-{dst}"), op="ip_add", addr=self.service_ip,
                            dev=f"{dst}-svc")
        return {"del_s": a["took_s"], "add_s": b["took_s"]}

    def _wait_up(self, intfs: list, timeout: float = 5.0) -> None:
        """Until (node, ifname)s are operationally up: before the kernel's linkwatch runs,
        a freshly upped veth drops what it is given."""
        pending = list(intfs)

        def up(node: str, ifname: str) -> bool:
            ln = self.net[node].ipr().get_links(ifname=ifname)
            return bool(ln) and ln[0].get_attr("IFLA_OPERSTATE") == "UP"

        def all_up() -> bool:
            pending[:] = [x for x in pending if not up(*x)]
            return not pending

        wait_until(all_up, timeout, "BoD path: " + ", ".join(f"{n} {i}" for n, i in intfs)
                   + " up", interval=0.005)

    # the end ---------------------------------------------------------------------------
    def finish(self, end: bool = True, timeout: float = None) -> dict:
        """End the stream now (end=False: wait for its content to run out); return the
        player's report, the streamers' reports, the FIN/RST packets the user saw before
        the server's close, and the checks."""
        timeout = timeout or self.seconds + self.burst_s + 120
        if end:
            control.request(self.streamers[-1][2], op="end")
        self.player.wait(timeout)
        with open(self.player_out) as f:
            player = json.load(f)
        reports = []
        for site, proc, _, out in self.streamers:
            proc.wait(30)
            with open(out) as f:
                reports.append({"site": site, **json.load(f)})
        last = reports[-1]
        flags = []
        if self.capture:
            self.cap.stop()
            for line in self.cap.log().splitlines():
                m = re.match(r"(\d+\.\d+) IP (\S+) > (\S+): Flags \[([^\]]*)\]", line)
                if m:
                    flags.append({"t": float(m.group(1)), "src": m.group(2),
                                  "dst": m.group(3), "flags": m.group(4)})
        t_close = last.get("t_close")
        early = [f for f in flags if t_close is None or f["t"] < t_close]
        contiguous = all(a["end_offset"] == b["start_offset"]
                         for a, b in zip(reports, reports[1:]))
        sent_hash = _stream_hash(last["end_offset"]) if contiguous else None
        return {"player": player, "streamers": reports, "fin_rst_before_close": early,
                "flag_packets": flags, "contiguous": contiguous,
                "sent_bytes": last["end_offset"], "sent_sha256": sent_hash,
                "hash_equal": sent_hash == player["sha256"],
                "bytes_equal": last["end_offset"] == player["bytes"],
                "migrations": len([h for h in self.history if h and h[-1]["step"] == 11])}
