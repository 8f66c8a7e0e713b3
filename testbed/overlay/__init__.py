"""A Spines-style overlay network: one daemon per overlay node, deployed on a Network.

    from testbed.overlay import start_overlay
    with Network(topo) as net:
        ov = start_overlay(net, ["a", "b", "c", "d", "e", "f"], hello_ms=500, cost="latency")
        ov.wait_converged(timeout=10)
        rx = ov.client("f").socket(9)
        tx = ov.client("a").socket(9, reliable=True, link="reliable")
        tx.sendto(b"hello", (ov.id("f"), 9))
        print(rx.recvfrom(timeout=5), ov.routes("a"), ov.stats("c")["drops"])
        ov.stop("c")                      # SIGKILL: a node failure

Modules: wire (every message format), reliable (selective repeat, windows, reordering),
linkstate (LSA database, Dijkstra), daemon (`python -m testbed.overlay`), client (the
socket-like library), ctl (`python -m testbed.overlay.ctl SOCK neighbours|routes|stats`).

Overlay node ids are 1..N in the order of `nodes` (or `ids=`). Overlay links default to the
topology's links between two overlay nodes; give `links=[("a", "c"), ...]` for others (the
underlay must route between their addresses). Every daemon listens on UDP `port` on all
its addresses and gets its neighbours' addresses on the segment they share (else their
first address). The shared HMAC key (random unless given) goes to a 0600 file in the run's
log directory; control sockets and ready files are there too, named by the port, so two
overlays (on two ports) can share a network.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Optional

from testbed.daemon import new_key, write_key
from testbed.daemon.keys import MIN_KEY_BYTES
from testbed.errors import SpecError, TestbedError
from testbed.overlay.client import OverlayError, OverlayTimeout, connect
from testbed.overlay.linkstate import COSTS
from testbed.poll import WaitTimeout, scaled, wait_until

DEFAULT_PORT = 8100


class Overlay:
    """The daemons of one overlay on a running Network."""

    def __init__(self, net, ids: dict, links: list, port: int, hello_ms: float, cost: str,
                 dead_hellos: float, key_file: str):
        self.net, self.ids, self.links, self.port = net, dict(ids), list(links), port
        self.names = {i: n for n, i in self.ids.items()}
        self.hello_ms, self.cost, self.dead_hellos = hello_ms, cost, dead_hellos
        self.key_file = key_file
        self.procs: dict = {}
        self._clients: list = []

    def __repr__(self) -> str:
        return f"<overlay of {len(self.ids)} nodes, {len(self.links)} links, cost {self.cost}>"

    # names and paths ----------------------------------------------------------------------
    def id(self, node: str) -> int:
        try:
            return self.ids[node]
        except KeyError:
            raise SpecError(f"{node!r} is not an overlay node "
                            f"(overlay: {', '.join(self.ids)})") from None

    def name(self, node_id: int) -> str:
        return self.names[node_id]

    def control_path(self, node: str) -> str:
        self.id(node)
        return os.path.join(self.net.log_dir, f"{node}.overlay{self.port}.sock")

    def ready_path(self, node: str) -> str:
        return os.path.join(self.net.log_dir, f"{node}.overlay{self.port}.ready")

    def neighbours_of(self, node: str) -> list:
        return [b if a == node else a for a, b in self.links if node in (a, b)]

    def argv(self, node: str) -> list:
        me = self.net[node]
        argv = [sys.executable, "-m", "testbed.overlay", "--id", str(self.id(node)),
                "--listen", f"0.0.0.0:{self.port}", "--key-file", self.key_file,
                "--control", self.control_path(node), "--ready-file", self.ready_path(node),
                "--hello-ms", f"{self.hello_ms:g}", "--cost", self.cost,
                "--dead-hellos", f"{self.dead_hellos:g}"]
        for other in self.neighbours_of(node):
            ip = self.net[other].ip_toward(me)
            argv += ["--neighbour", f"{self.id(other)}={ip}:{self.port}"]
        return argv

    # daemons ------------------------------------------------------------------------------
    def _launch(self, nodes: list, timeout: float) -> None:
        from testbed.process import file_exists

        started = []
        try:
            for n in nodes:
                try:
                    os.unlink(self.ready_path(n))
                except FileNotFoundError:
                    pass
                p = self.net[n].start(self.argv(n), name=f"overlay{self.port}")
                self.procs[n] = p
                started.append(n)
            for n in nodes:
                self.procs[n].wait_ready(file_exists(self.ready_path(n)), timeout)
        except BaseException:
            for n in started:
                self.procs[n].stop()
            raise

    def alive(self, node: str) -> bool:
        p = self.procs.get(node)
        return p is not None and p.alive

    def stop(self, node: str, kill: bool = True) -> None:
        """Stop node's daemon: SIGKILL (a crash, the default) or SIGTERM (it floods a
        goodbye first). The node stays in the overlay's configuration."""
        self.id(node)
        p = self.procs.get(node)
        if p is None or not p.alive:
            return
        if kill:
            p.signal(signal.SIGKILL)
        p.stop()

    def start(self, node: str, timeout: float = 15.0) -> None:
        """(Re)start node's daemon after stop()."""
        if self.alive(node):
            raise TestbedError(f"the overlay daemon of {node} is running")
        self._launch([node], timeout)

    def close(self) -> None:
        for c in self._clients:
            try:
                c.close()
            except Exception:
                pass
        self._clients.clear()
        for n in self.procs:
            self.stop(n, kill=False)

    # clients and state --------------------------------------------------------------------
    def client(self, node: str, timeout: float = 5.0):
        """A client.Connection to node's daemon (closed by close())."""
        c = connect(self.control_path(node), timeout)
        self._clients.append(c)
        return c

    def _ask(self, node: str, op: str) -> dict:
        with connect(self.control_path(node)) as c:
            return c.request(op)

    def routes(self, node: str) -> dict:
        """{dst node name: {"next_hop": name, "cost": int, "path": [names]}}."""
        out = {}
        for r in self._ask(node, "routes")["routes"]:
            out[self.names.get(r["dst"], r["dst"])] = {
                "next_hop": self.names.get(r["next_hop"], r["next_hop"]), "cost": r["cost"],
                "path": [self.names.get(x, x) for x in r["path"]]}
        return out

    def neighbours(self, node: str) -> dict:
        return {self.names.get(n["id"], n["id"]): n
                for n in self._ask(node, "neighbours")["neighbours"]}

    def stats(self, node: str) -> dict:
        return self._ask(node, "stats")

    def path(self, src: str, dst: str) -> Optional[list]:
        """Follow the daemons' next hops from src to dst (None if a hop has no route or the
        walk loops)."""
        hops, cur = [src], src
        for _ in range(len(self.ids)):
            r = self.routes(cur).get(dst)
            if r is None:
                return None
            cur = r["next_hop"]
            hops.append(cur)
            if cur == dst:
                return hops
        return None

    def expected_reachable(self) -> dict:
        """node -> the set of nodes its daemon should reach: over configured links between
        running daemons."""
        alive = {n for n in self.ids if self.alive(n)}
        adj = {n: set() for n in alive}
        for a, b in self.links:
            if a in alive and b in alive:
                adj[a].add(b)
                adj[b].add(a)
        out = {}
        for n in alive:
            seen, todo = {n}, [n]
            while todo:
                for m in adj[todo.pop()]:
                    if m not in seen:
                        seen.add(m)
                        todo.append(m)
            out[n] = seen - {n}
        return out

    def converged(self, links_up: bool = True) -> Optional[str]:
        """None once the running daemons agree: the same link-state database everywhere,
        every configured link between two of them up at both ends (links_up=False skips
        this, for links cut on purpose), routes to exactly the nodes each should reach and
        next-hop walks that arrive. Otherwise, what is still wrong."""
        want = self.expected_reachable()
        stats, tables = {}, {}
        for n in want:
            try:
                stats[n] = self.stats(n)
                tables[n] = self.routes(n)
            except TestbedError as e:
                return f"{n}: {e}"
        dbs = {n: {o: v["seq"] for o, v in st["lsdb"].items()} for n, st in stats.items()}
        first = next(iter(dbs), None)
        for n, db in dbs.items():
            if db != dbs[first]:
                return f"the link-state databases of {first} and {n} differ"
        if links_up:
            for a, b in self.links:
                for x, y in ((a, b), (b, a)):
                    if x in stats and y in stats and \
                            not stats[x]["links"][str(self.ids[y])]["up"]:
                        return f"{x} does not have its link to {y} up"
        for n, reach in want.items():
            have = set(tables[n])
            if have != reach:
                return f"{n} routes to {sorted(have)}, should reach {sorted(reach)}"
            for dst in reach:
                cur, steps = n, 0
                while cur != dst:
                    r = tables.get(cur, {}).get(dst)
                    steps += 1
                    if r is None or steps > len(self.ids):
                        return f"next hops from {n} do not reach {dst} (stuck at {cur})"
                    cur = r["next_hop"]
        return None

    def wait_converged(self, timeout: float = 10.0, interval: float = 0.02,
                       links_up: bool = True) -> float:
        """Poll until converged(); returns the seconds it took. TestbedError on timeout
        (after timeout seconds scaled by TESTBED_TIMEOUT_SCALE), saying what is wrong."""
        t0 = time.monotonic()
        why = []

        def done() -> bool:
            why[:] = [self.converged(links_up)]
            return why[0] is None

        try:
            wait_until(done, timeout, "overlay converged", interval=interval)
        except WaitTimeout:
            raise TestbedError(f"overlay not converged after {scaled(timeout):g} s: "
                               f"{why[0]}") from None
        return time.monotonic() - t0


def start_overlay(net, nodes=None, links=None, key: Optional[bytes] = None,
                  hello_ms: float = 500, cost: str = "latency", port: int = DEFAULT_PORT,
                  dead_hellos: float = 2.5, ids: Optional[dict] = None,
                  ready_timeout: float = 15.0) -> Overlay:
    """Start one overlay daemon per node (default: every host and router) and wait until
    each is ready. Checked first (a SpecError starts nothing)."""
    if nodes is None:
        nodes = [n for n, node in net.nodes.items() if node.kind != "switch"]
    nodes = list(nodes)
    if not nodes:
        raise SpecError("an overlay needs at least one node")
    for n in nodes:
        node = net[n]
        if node.kind == "switch":
            raise SpecError(f"{n} is a switch: overlay daemons run on hosts and routers")
    if len(set(nodes)) != len(nodes):
        raise SpecError("overlay nodes given twice")
    if ids is None:
        ids = {n: i for i, n in enumerate(nodes, start=1)}
    else:
        ids = dict(ids)
        if set(ids) != set(nodes):
            raise SpecError("ids= must give an id to every overlay node and no other")
        bad = [v for v in ids.values() if not isinstance(v, int) or not 1 <= v <= 65535]
        if bad or len(set(ids.values())) != len(ids):
            raise SpecError("overlay ids must be distinct integers 1..65535")
    members = set(nodes)
    if links is None:
        links = []
        for ln in net.plan.links:
            pair = (ln.a, ln.b)
            if ln.a in members and ln.b in members and pair not in links \
                    and (ln.b, ln.a) not in links:
                links.append(pair)
    else:
        checked = []
        for pair in links:
            try:
                a, b = pair
            except (TypeError, ValueError):
                raise SpecError(f"an overlay link is a pair of nodes, got {pair!r}") from None
            for x in (a, b):
                if x not in members:
                    raise SpecError(f"overlay link {a}-{b}: {x!r} is not an overlay node")
            if a == b:
                raise SpecError(f"overlay link {a}-{b}: a node cannot link to itself")
            if (a, b) in checked or (b, a) in checked:
                raise SpecError(f"overlay link {a}-{b} given twice")
            checked.append((a, b))
        links = checked
    if cost not in COSTS:
        raise SpecError(f"cost must be one of {', '.join(COSTS)}, got {cost!r}")
    if not isinstance(hello_ms, (int, float)) or not 10 <= hello_ms <= 60000:
        raise SpecError(f"hello_ms must be 10..60000, got {hello_ms!r}")
    if not isinstance(dead_hellos, (int, float)) or not 1.5 <= dead_hellos <= 100:
        raise SpecError(f"dead_hellos must be 1.5..100, got {dead_hellos!r}")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise SpecError(f"port must be 1..65535, got {port!r}")
    if key is None:
        key = new_key()
    if not isinstance(key, (bytes, bytearray)) or len(key) < MIN_KEY_BYTES:
        raise SpecError(f"the overlay key must be at least {MIN_KEY_BYTES} bytes")
    for n in nodes:
        for other in [b if a == n else a for a, b in links if n in (a, b)]:
            net[other].ip_toward(net[n])  # raises if a node has no address
    for other in net.owned(Overlay):
        if other.port == port and any(other.alive(n) for n in other.ids):
            raise SpecError(f"an overlay already runs on port {port} in this network "
                            f"(close() it, or give another port=)")
    key_file = os.path.join(net.log_dir, f"overlay{port}.key")
    os.makedirs(net.log_dir, exist_ok=True)
    write_key(key_file, bytes(key))
    ov = Overlay(net, ids, links, port, hello_ms, cost, dead_hellos, key_file)
    ov._launch(nodes, ready_timeout)
    return net.own(ov, stop=ov.close)  # teardown closes its clients, TERMs its daemons


__all__ = ["Overlay", "start_overlay", "connect", "OverlayError", "OverlayTimeout",
           "DEFAULT_PORT", "COSTS"]
