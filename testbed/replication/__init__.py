"""Paper 004's replication engine (Amir and Tutu), its group communication and its two
baselines (COReL, upper-bound 2PC): see docs/replication.md.

This module is the harness that runs replicas in a Network:

    from testbed.replication import start_replicas
    with Network(replication_lan.build(replicas=5)) as net:
        rs = start_replicas(net, ["r1", "r2", "r3", "r4", "r5"], algo="engine")
        rs.wait_primary(["r1", "r2", "r3", "r4", "r5"])
        with rs.client("r2") as c:                 # a ReplicaClient inside r2's namespace
            c.update(b"...")
        rs.partition([["r1", "r2", "r3"], ["r4", "r5"]])    # netfilter DROP rules
        rs.wait_primary(["r1", "r2", "r3"])
        rs.heal()
        rs.crash("r1"); rs.recover("r1")           # SIGKILL; start again on the same disk
        rs.loadgens({"r1": 2, "r2": 2}, seconds=5)  # closed-loop clients -> their results

Replica ids are 1..N in the order of `nodes`. Every replica gets a JSON configuration (the
keys of docs/replication.md), a data directory, a status file and a ready file in the run's
log directory, beside the shared HMAC key (hex, 0600: testbed.daemon.write_key). The
server is `python -m testbed.replication.server CONFIG`; readiness is its ready file.

Partitions are netfilter rules in each replica's own namespace: a chain (PARTITION_CHAIN)
hooked into INPUT and OUTPUT that drops every packet from and to the replicas outside the
replica's group, broadcasts included (they are matched by source on the way in). One
`iptables-restore --noflush` per namespace replaces the chain's rules whole, so a replica
never sees half a partition; heal() empties the chains and stop() removes them.
Clients run inside a replica's namespace and talk to that replica, which the rules never
cut (the paper's clients ran beside their replica). A new replica joins (PERSISTENT_JOIN,
state transfer) with testbed.replication.transfer.join(rs, node, via) and a replica is
removed with transfer.leave(rs, node).
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import sys
import time
from typing import Iterable, Optional

from testbed.daemon import new_key, write_key
from testbed.errors import SpecError, TestbedError
from testbed.poll import WaitTimeout, wait_until

ALGOS = ("engine", "corel", "2pc")
GC_PORT, CLIENT_PORT, TWOPC_PORT = 8300, 8310, 8320
PARTITION_CHAIN = "TBREPL"
PRIMARY_STATE = "RegPrim"

__all__ = ["start_replicas", "Replicas", "ALGOS", "GC_PORT", "CLIENT_PORT", "TWOPC_PORT",
           "check_nodes", "check_groups", "alg_status", "primary_view", "applied_of",
           "counters"]


# validation (nothing is created before all of it passed) ---------------------------------

def _number(value, what: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise SpecError(f"replication: {what} must be a number from {lo:g} to {hi:g}, "
                        f"got {value!r}")
    return float(value)


def _port(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise SpecError(f"replication: {what} must be a port 1-65535, got {value!r}")
    return value


def check_nodes(net, nodes) -> tuple:
    """(nodes as a list, {node: IPv4Interface}): known hosts, each listed once, all with an
    address on one shared subnet (the replicas' LAN)."""
    if isinstance(nodes, str) or not hasattr(nodes, "__iter__"):
        raise SpecError(f"replication: nodes must be a list of node names, got {nodes!r}")
    nodes = list(nodes)
    if not nodes:
        raise SpecError("replication: no replicas")
    if len(nodes) > 255:
        raise SpecError("replication: at most 255 replicas")
    if len(set(nodes)) != len(nodes):
        raise SpecError("replication: a replica is listed twice")
    addrs: dict = {}
    for n in nodes:
        if not isinstance(n, str) or n not in net.plan.nodes:
            raise SpecError(f"replication: unknown node {n!r}")
        if net.plan.nodes[n].kind == "switch":
            raise SpecError(f"replication: {n} is a switch, not a replica")
        mine = [a for (m, _), a in net.plan.addressing.addresses.items() if m == n]
        if not mine:
            raise SpecError(f"replication: {n} has no address")
        addrs[n] = mine
    subnet = addrs[nodes[0]][0].network
    out = {}
    for n in nodes:
        on = [a for a in addrs[n] if a.network == subnet]
        if not on:
            raise SpecError(f"replication: {n} is not on the replicas' subnet {subnet}")
        out[n] = on[0]
    return nodes, out


def check_groups(nodes: list, groups) -> list:
    """groups: a list of lists of replicas, each replica in exactly one."""
    if isinstance(groups, (str, bytes)) or not hasattr(groups, "__iter__"):
        raise SpecError(f"replication: groups must be a list of lists of replicas, "
                        f"got {groups!r}")
    out = []
    seen: set = set()
    for g in groups:
        if isinstance(g, str) or not hasattr(g, "__iter__"):
            raise SpecError(f"replication: a group must be a list of replicas, got {g!r}")
        g = list(g)
        if not g:
            raise SpecError("replication: an empty group")
        for n in g:
            if n not in nodes:
                raise SpecError(f"replication: {n!r} is not a replica "
                                f"({', '.join(nodes)})")
            if n in seen:
                raise SpecError(f"replication: {n} is in two groups")
            seen.add(n)
        out.append(g)
    missing = [n for n in nodes if n not in seen]
    if missing:
        raise SpecError(f"replication: {', '.join(missing)} in no group (every replica must "
                        f"be in one)")
    return out


# reading a status file ------------------------------------------------------------------

def alg_status(st: Optional[dict]) -> dict:
    """The algorithm's part of a replica's status (server.py: status["alg"])."""
    if not st:
        return {}
    return st.get("alg") if isinstance(st.get("alg"), dict) else {}


def primary_view(st: Optional[dict]) -> Optional[tuple]:
    """(state, primary index, attempt, members) as the replica reports them, or None.
    The engine reports its last primary component (prim: index, attempt, members); COReL
    and 2PC have no numbered primaries: index and attempt are None and the members are
    those of the current configuration."""
    a = alg_status(st)
    if not a:
        return None
    prim = a.get("prim")
    if isinstance(prim, dict):
        return (a.get("state"), prim.get("index"), prim.get("attempt"),
                tuple(sorted(prim.get("members") or ())))
    return (a.get("state"), None, None, tuple(sorted(a.get("members") or ())))


def applied_of(st: Optional[dict]) -> Optional[tuple]:
    """(position in the global order, running hash) from a status, or None: the engine's
    green ordinal (duplicates included: they take a place in the order and the hash), the
    baselines' applied ordinal."""
    a = alg_status(st)
    if not a:
        return None
    n = a.get("green", a.get("applied"))
    if n is None:
        return None
    return int(n), a.get("hash")


def _total(v) -> float:
    if isinstance(v, dict):
        return sum(x for x in v.values() if isinstance(x, (int, float)))
    return v if isinstance(v, (int, float)) else 0


def counters(st: Optional[dict]) -> dict:
    """Flat numeric counters of a status for per-action accounting: forced_writes (appends
    that asked for force: the same count in forced and asynchronous runs), writes,
    force_seconds, packets sent (the group communication's by kind: data, ordered, ack,
    nack, membership; 2PC's own), multicasts and unicasts (the packets that carry actions,
    acknowledgements and retransmissions: heartbeats and membership rounds left out),
    packets_sent (their sum), bytes sent, applied (position in the order)."""
    if not st:
        return {}
    disk = st.get("disk") or {}
    gc = st.get("gc") or {}
    a = alg_status(st)
    out = {"writes": disk.get("writes", 0),
           "forced_writes": disk.get("force_requests", disk.get("forced_writes", 0)),
           "force_seconds": disk.get("force_seconds", 0.0)}
    by_kind = gc.get("packets_sent") if isinstance(gc.get("packets_sent"), dict) else {}
    for kind in ("data", "ordered", "ack", "nack", "membership"):
        out[f"gc_{kind}"] = by_kind.get(kind, 0)
    out["gc_packets_sent"] = _total(gc.get("packets_sent", 0))
    out["gc_bytes_sent"] = gc.get("bytes_sent", 0)
    out["configurations"] = gc.get("configurations", 0)
    out["alg_packets_sent"] = _total(a.get("packets_sent", 0))
    # per action: what the actions cost (not the heartbeats and membership rounds, which
    # come with time): the broadcast ORDERED datagrams, and the unicasts (DATA to the
    # sequencer, ACK, NACK; 2PC's own messages)
    out["multicasts"] = out["gc_ordered"]
    out["unicasts"] = (out["gc_data"] + out["gc_ack"] + out["gc_nack"]
                       + out["alg_packets_sent"])
    out["packets_sent"] = out["multicasts"] + out["unicasts"]
    applied = applied_of(st)
    out["applied"] = applied[0] if applied else 0
    return out


# the replicas ----------------------------------------------------------------------------

class Replicas:
    """The replica servers of one replicated database on a running Network (see
    start_replicas)."""

    def __init__(self, net, nodes: list, addrs: dict, configs: dict, algo: str,
                 profile: tuple = ()):
        self.net, self.nodes, self.algo = net, list(nodes), algo
        self.ids = {n: i + 1 for i, n in enumerate(nodes)}
        self.names = {i: n for n, i in self.ids.items()}
        self.ips = {n: str(addrs[n].ip) for n in nodes}
        self.configs = configs  # node -> config dict (with "path")
        self.profile = tuple(profile)
        self.procs: dict = {}
        self.crashes = 0
        self._hooked: set = set()  # nodes whose INPUT/OUTPUT jump to PARTITION_CHAIN
        self.groups: Optional[list] = None

    def __repr__(self) -> str:
        return f"<replicas {self.algo} x{len(self.nodes)}>"

    def _check(self, node: str) -> str:
        if node not in self.ids:
            raise SpecError(f"replication: {node!r} is not a replica ({', '.join(self.nodes)})")
        return node

    def argv(self, node: str) -> list:
        cfg = self.configs[node]
        if node in self.profile:
            return [sys.executable, "-m", "cProfile", "-o", cfg["profile_file"], "-m",
                    "testbed.replication.server", cfg["path"]]
        return [sys.executable, "-m", "testbed.replication.server", cfg["path"]]

    # lifecycle ---------------------------------------------------------------------------
    def start(self, *nodes: str, timeout: float = 30.0) -> None:
        """Start (or restart, on its data directory) the servers of nodes (default: every
        one not running), then wait for their ready files."""
        from testbed.process import file_exists

        names = [self._check(n) for n in nodes] or [n for n in self.nodes if not self.alive(n)]
        for n in names:
            if self.alive(n):
                raise TestbedError(f"replication: the server on {n} is already running")
        for n in names:
            for key in ("ready_file", "status_file"):
                try:
                    os.unlink(self.configs[n][key])
                except FileNotFoundError:
                    pass
            self.procs[n] = self.net[n].start(self.argv(n), name=f"replica-{self.algo}")
        for n in names:
            self.procs[n].wait_ready(file_exists(self.configs[n]["ready_file"]), timeout)

    def alive(self, node: str) -> bool:
        p = self.procs.get(self._check(node))
        return p is not None and p.alive

    def running(self) -> list:
        return [n for n in self.nodes if self.alive(n)]

    def crash(self, node: str) -> None:
        """SIGKILL the server (no goodbye, nothing flushed beyond what it forced)."""
        p = self.procs.get(self._check(node))
        if p is None or not p.alive:
            raise TestbedError(f"replication: no server running on {node}")
        p.signal(signal.SIGKILL)
        p.wait(10)
        self.crashes += 1

    def recover(self, node: str, timeout: float = 30.0) -> None:
        """Start a crashed server again, on the same data directory."""
        self.start(self._check(node), timeout=timeout)

    def stop(self) -> None:
        """Stop every server (TERM, then KILL) and remove the partition rules."""
        errors = []
        for n in self.nodes:
            p = self.procs.get(n)
            if p is not None and p.alive:
                try:
                    p.stop(grace=5)
                except Exception as e:  # keep stopping the others
                    errors.append(f"{n}: {e}")
        for n in sorted(self._hooked):
            self._unhook(n)
        self._hooked.clear()
        self.groups = None
        if errors:
            raise TestbedError("replication: " + "; ".join(errors))

    # partitions --------------------------------------------------------------------------
    def partition(self, groups) -> None:
        """Cut the replicas into groups (a list of lists covering every replica): packets
        between replicas of different groups are dropped, in both directions."""
        groups = check_groups(self.nodes, groups)
        side = {n: i for i, g in enumerate(groups) for n in g}
        for n in self.nodes:
            others = [self.ips[m] for m in self.nodes if side[m] != side[n]]
            self._load_chain(n, others)
        self.groups = groups

    def heal(self) -> None:
        """Remove every cut: the chains are emptied."""
        for n in sorted(self._hooked):
            self._load_chain(n, [])
        self.groups = None

    def _load_chain(self, node: str, drop_ips: list) -> None:
        lines = ["*filter", f":{PARTITION_CHAIN} - [0:0]"]
        if node not in self._hooked:
            lines += [f"-I INPUT -j {PARTITION_CHAIN}", f"-I OUTPUT -j {PARTITION_CHAIN}"]
        for ip in drop_ips:
            lines += [f"-A {PARTITION_CHAIN} -s {ip}/32 -j DROP",
                      f"-A {PARTITION_CHAIN} -d {ip}/32 -j DROP"]
        lines.append("COMMIT")
        self.net[node].run(["iptables-restore", "-w", "--noflush"], input="\n".join(lines) + "\n")
        self._hooked.add(node)

    def _unhook(self, node: str) -> None:
        n = self.net[node]
        for argv in (["-D", "INPUT", "-j", PARTITION_CHAIN], ["-D", "OUTPUT", "-j",
                                                               PARTITION_CHAIN],
                     ["-F", PARTITION_CHAIN], ["-X", PARTITION_CHAIN]):
            n.run(["iptables", "-w", *argv], check=False)

    def partition_rules(self, node: str) -> list:
        """The DROP rules now in node's chain (from iptables -S)."""
        out = self.net[self._check(node)].run(["iptables", "-w", "-S", PARTITION_CHAIN],
                                              check=False).stdout
        return [ln for ln in out.splitlines() if ln.startswith("-A")]

    # observation -------------------------------------------------------------------------
    def status(self, node: str) -> Optional[dict]:
        """The server's last status file (None before it wrote one)."""
        path = self.configs[self._check(node)]["status_file"]
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def statuses(self, nodes: Optional[Iterable] = None) -> dict:
        return {n: self.status(n) for n in (self.nodes if nodes is None else nodes)}

    def primary(self, node: str) -> Optional[tuple]:
        """(state, primary id, attempt, member names) of node's algorithm, or None."""
        v = primary_view(self.status(node))
        if v is None:
            return None
        state, pid, attempt, members = v
        return state, pid, attempt, tuple(sorted(self.names.get(m, m) for m in members))

    def in_primary(self, members: Iterable[str]) -> tuple:
        """(True, "") when every one of members is in RegPrim with exactly those members
        in its primary component, else (False, why)."""
        members = [self._check(m) for m in members]
        want = tuple(sorted(members))
        for m in members:
            if not self.alive(m):
                return False, f"{m}: not running"
            v = self.primary(m)
            if v is None:
                return False, f"{m}: no status yet"
            if v[0] != PRIMARY_STATE:
                return False, f"{m}: state {v[0]}"
            if v[3] != want:
                return False, f"{m}: primary {list(v[3])} != {list(want)}"
        return True, ""

    def wait_primary(self, members: Iterable[str], timeout: float = 30.0) -> float:
        """Wait until members form the primary component (every one in RegPrim with those
        members); returns the seconds it took, TestbedError with the reason after timeout."""
        members = list(members)
        t0 = time.monotonic()
        why = ""

        def done() -> bool:
            nonlocal why
            ok, why = self.in_primary(members)
            return ok

        try:
            wait_until(done, timeout, "replication: primary", interval=0.05)
        except WaitTimeout:
            raise TestbedError(f"replication: no primary of {members} after {timeout:g} s: "
                               f"{why}") from None
        return time.monotonic() - t0

    def applied_hashes(self, nodes: Optional[Iterable] = None) -> dict:
        """node -> (applied actions, hash) from the status files (None if none yet)."""
        return {n: applied_of(st) for n, st in self.statuses(nodes).items()}

    def wait_converged(self, nodes: Optional[Iterable] = None, timeout: float = 30.0,
                       at_least: int = 0, hashes: Optional[bool] = None) -> tuple:
        """Wait until the running replicas among nodes report one same (applied, hash)
        with at least at_least actions applied; returns it. hashes=False compares the
        counts only: the default for the upper-bound 2PC, which (as the paper's) takes no
        locks, so its replicas may apply concurrent actions in different orders."""
        names = list(self.nodes if nodes is None else nodes)
        hashes = self.algo != "2pc" if hashes is None else hashes
        seen: dict = {}

        def same():
            nonlocal seen
            seen = self.applied_hashes([n for n in names if self.alive(n)])
            vals = set(seen.values() if hashes else
                       ((v[0], None) if v else None for v in seen.values()))
            if len(vals) == 1 and None not in vals and next(iter(vals))[0] >= at_least:
                return next(iter(vals))
            return None

        try:
            return wait_until(same, timeout, "replication: converged", interval=0.1)
        except WaitTimeout:
            raise TestbedError(f"replication: replicas differ after {timeout:g} s: "
                               f"{seen}") from None

    def counters(self, nodes: Optional[Iterable] = None) -> dict:
        """node -> counters(status) (forced writes, packets sent, applied)."""
        return {n: counters(st) for n, st in self.statuses(nodes).items()}

    def cpu_seconds(self) -> dict:
        """node -> user + system CPU seconds of its running server (from /proc)."""
        tick = os.sysconf("SC_CLK_TCK")
        out = {}
        for n in self.nodes:
            p = self.procs.get(n)
            if p is None or not p.alive:
                continue
            try:
                with open(f"/proc/{p.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out[n] = (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                pass
        return out

    def profile_file(self, node: str) -> Optional[str]:
        """Where a profiled server's cProfile data lands (written when it stops)."""
        return self.configs[self._check(node)].get("profile_file")

    # clients -----------------------------------------------------------------------------
    def client(self, node: str, **kw):
        """A ReplicaClient connected, from inside node's namespace, to node's replica."""
        from testbed.kernel import netns as kns
        from testbed.replication.client import ReplicaClient

        node = self._check(node)
        with kns.enter(self.net[node].ns):
            return ReplicaClient(self.ips[node], self.configs[node]["client_port"], **kw)

    def loadgen(self, node: str, clients: int, seconds: float, **kw) -> dict:
        """One load generator in node's namespace against node's replica; its results."""
        return self.loadgens({node: clients}, seconds, **kw)[node]

    def loadgens(self, plan: dict, seconds: float, size: int = 200, warmup: float = 0.0,
                 tag: str = "load", timeout: Optional[float] = None) -> dict:
        """Load generators at once, one per node of plan ({node: clients}, clients >= 1),
        each with its closed-loop clients against its own replica; {node: results}."""
        if not isinstance(plan, dict) or not plan:
            raise SpecError("replication: plan must be a non-empty {node: clients}")
        for n, k in plan.items():
            self._check(n)
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 1000:
                raise SpecError(f"replication: clients on {n} must be 1-1000, got {k!r}")
        seconds = _number(seconds, "seconds", 0.1, 86400)
        warmup = _number(warmup, "warmup", 0, 3600)
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 1200:
            raise SpecError(f"replication: size must be 1-1200 bytes, got {size!r}")
        if not tag.replace("-", "").replace("_", "").isalnum():
            raise SpecError(f"replication: bad tag {tag!r}")
        procs = {}
        for n, k in plan.items():
            out = os.path.join(self.net.log_dir, f"{n}.{tag}.json")
            try:
                os.unlink(out)
            except FileNotFoundError:
                pass
            argv = [sys.executable, "-m", "testbed.replication.loadgen", "--server",
                    f"{self.ips[n]}:{self.configs[n]['client_port']}", "--clients", str(k),
                    "--seconds", f"{seconds:g}", "--size", str(size), "--warmup",
                    f"{warmup:g}", "--out", out]
            procs[n] = (self.net[n].start(argv, name=f"loadgen-{tag}"), out)
        limit = timeout if timeout is not None else warmup + seconds + 30
        results, errors = {}, []
        for n, (p, out) in procs.items():
            try:
                rc = p.wait(limit)
            except TestbedError as e:
                p.stop()
                errors.append(str(e))
                continue
            try:
                with open(out) as f:
                    results[n] = json.load(f)
            except (OSError, ValueError):
                errors.append(f"{n}: loadgen exited with {rc} and no results: "
                              f"{p.log(tail=3).strip()}")
        if errors:
            raise TestbedError("replication: " + "; ".join(errors))
        return results


def start_replicas(net, nodes, algo: str = "engine", forced: bool = True,
                   extra_latency_ms: float = 8.5, gc_port: int = GC_PORT,
                   client_port: int = CLIENT_PORT, twopc_port: int = TWOPC_PORT,
                   key: Optional[bytes] = None, name: str = "repl", options: Optional[dict] = None,
                   profile: Iterable[str] = (), start: bool = True,
                   timeout: float = 30.0) -> Replicas:
    """Start a replica server on each of nodes (ids 1..N in this order), all running algo
    ("engine", "corel" or "2pc") with forced (fsync + extra_latency_ms) or asynchronous
    disk writes, and wait until each is ready. Everything is checked first (one-line
    SpecError, nothing written or started). The network owns the result (stopped at
    teardown). options: extra configuration keys for every server; profile: nodes whose
    server runs under cProfile (its data is written when it stops); start=False only
    writes the configurations (call .start())."""
    if not getattr(net, "running", False):
        raise SpecError("replication: the network is not running")
    nodes, addrs = check_nodes(net, nodes)
    if algo not in ALGOS:
        raise SpecError(f"replication: algo must be one of {', '.join(ALGOS)}, got {algo!r}")
    if not isinstance(forced, bool):
        raise SpecError(f"replication: forced must be True or False, got {forced!r}")
    extra_latency_ms = _number(extra_latency_ms, "extra_latency_ms", 0, 10_000)
    ports = {"gc_port": _port(gc_port, "gc_port"),
             "client_port": _port(client_port, "client_port"),
             "twopc_port": _port(twopc_port, "twopc_port")}
    if len(set(ports.values())) != 3:
        raise SpecError(f"replication: gc_port, client_port and twopc_port must differ, "
                        f"got {ports}")
    if key is not None and (not isinstance(key, bytes) or len(key) < 16):
        raise SpecError("replication: key must be at least 16 bytes")
    if not isinstance(name, str) or not name.isidentifier():
        raise SpecError(f"replication: bad name {name!r}")
    if options is not None and not isinstance(options, dict):
        raise SpecError(f"replication: options must be a dict, got {options!r}")
    reserved = {"id", "algo", "peers", "key_file", "data_dir", "disk", "status_file",
                "ready_file", "broadcast_ip", *ports}
    clash = sorted(reserved & set(options or {}))
    if clash:
        raise SpecError(f"replication: options may not set {', '.join(clash)}")
    profile = tuple(profile)
    for n in profile:
        if n not in nodes:
            raise SpecError(f"replication: profile: {n!r} is not a replica")

    os.makedirs(net.log_dir, exist_ok=True)
    key_file = os.path.join(net.log_dir, f"{name}.key")
    write_key(key_file, key or new_key())
    subnet: ipaddress.IPv4Network = addrs[nodes[0]].network
    peers = {str(i + 1): str(addrs[n].ip) for i, n in enumerate(nodes)}
    configs = {}
    for i, n in enumerate(nodes):
        base = os.path.join(net.log_dir, f"{n}.{name}")
        cfg = {"id": i + 1, "algo": algo, "peers": peers, **ports, "key_file": key_file,
               "data_dir": base + ".data",
               "disk": {"forced": forced, "extra_latency_ms": extra_latency_ms},
               "status_file": base + ".status.json", "ready_file": base + ".ready",
               "broadcast_ip": str(subnet.broadcast_address), **(options or {})}
        os.makedirs(cfg["data_dir"], exist_ok=True)
        with open(base + ".json", "w") as f:
            json.dump(cfg, f, indent=1)
        cfg["path"] = base + ".json"
        if n in profile:
            cfg["profile_file"] = base + ".prof"
        configs[n] = cfg
    rs = net.own(Replicas(net, nodes, addrs, configs, algo, profile))
    if start:
        rs.start(timeout=timeout)
    return rs
