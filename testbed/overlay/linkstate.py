"""Link-state database and shortest paths. Pure: no sockets, times passed in.

Every daemon originates one LSA listing its live links (neighbour, one-way delay, loss of
its outgoing direction) with a sequence number that only grows (it starts at the daemon's
start time in microseconds). LSAs are flooded on change and refreshed periodically; a
receiver keeps the newest per origin, ages it (the age travels with the LSA, so a dead
node's LSA disappears everywhere at the same time) and drops it at max age.

A link u-v enters the graph only if both u's and v's LSAs list it (the two-way check), so a
crashed node vanishes from everyone's routes as soon as its neighbours stop listing it,
without waiting for its own LSA to age out.

Costs (`COSTS`), the same on every daemon of an overlay, integer weights >= 1:
- hops: 1 per link;
- latency: the link's one-way delay in units of 100 us;
- expected: the delay a message can expect with hop-by-hop recovery under loss p:
  delay * (1 + p) / (1 - p), i.e. (1 - p) * d + p * 3d to first order (a lost message
  costs a retransmission after one round trip).
"""

from __future__ import annotations

import heapq
import zlib
from typing import NamedTuple

from testbed.overlay.wire import Lsa

COSTS = ("hops", "latency", "expected")
MAX_LOSS = 0.99


def link_weight(cost: str, delay_us: int, loss: int) -> int:
    """The integer weight of a link by cost mode; loss in 1e-4 units."""
    if cost == "hops":
        return 1
    units = delay_us / 100.0
    if cost == "expected":
        p = min(loss / 1e4, MAX_LOSS)
        units = units * (1 + p) / (1 - p)
    return max(1, int(round(units)))


class Route(NamedTuple):
    cost: int
    next_hop: int
    path: tuple  # node ids from the source to the destination


def shortest_paths(graph: dict, src: int) -> dict:
    """Dijkstra: {dst: Route} for every node reachable from src (src itself excluded).
    graph: {u: {v: weight}}. Ties go to the first path found in (distance, node id) order,
    so every daemon with the same database picks the same paths."""
    dist = {src: 0}
    prev: dict = {}
    heap = [(0, src)]
    done = set()
    while heap:
        d, u = heapq.heappop(heap)
        if u in done:
            continue
        done.add(u)
        for v in sorted(graph.get(u, ())):
            nd = d + graph[u][v]
            if v not in dist or nd < dist[v]:
                dist[v] = nd
                prev[v] = u
                heapq.heappush(heap, (nd, v))
    routes = {}
    for dst in dist:
        if dst == src:
            continue
        path = [dst]
        while path[-1] != src:
            path.append(prev[path[-1]])
        path.reverse()
        routes[dst] = Route(dist[dst], path[1], tuple(path))
    return routes


def _lsa_hash(origin: int, seq: int) -> int:
    return zlib.crc32(origin.to_bytes(2, "big") + seq.to_bytes(8, "big"))


class LinkStateDB:
    """The newest LSA per origin, with its age."""

    def __init__(self, max_age_s: int = 120):
        self.max_age_s = max_age_s
        self.lsas: dict = {}  # origin -> (Lsa, monotonic time it was installed)
        self.digest = 0  # XOR of a hash of every (origin, seq): equal databases, equal digests

    def age(self, origin: int, now: float) -> int:
        lsa, at = self.lsas[origin]
        return lsa.age_s + int(now - at)

    def install(self, lsa: Lsa, now: float) -> bool:
        """Keep lsa if it is newer than what we have (and not too old); True if kept."""
        if lsa.age_s >= self.max_age_s:
            return False
        old = self.lsas.get(lsa.origin)
        if old is not None:
            if lsa.seq <= old[0].seq:
                return False
            self.digest ^= _lsa_hash(old[0].origin, old[0].seq)
        self.lsas[lsa.origin] = (lsa, now)
        self.digest ^= _lsa_hash(lsa.origin, lsa.seq)
        return True

    def get(self, origin: int):
        entry = self.lsas.get(origin)
        return None if entry is None else entry[0]

    def current(self, now: float, origins=None) -> list:
        """The LSAs (of origins, default all) with their ages brought up to date."""
        out = []
        for o in (self.lsas if origins is None else origins):
            if o in self.lsas:
                lsa, at = self.lsas[o]
                out.append(Lsa(lsa.origin, lsa.seq, min(lsa.age_s + int(now - at), 0xFFFF),
                               lsa.links))
        return out

    def expire(self, now: float, keep=()) -> list:
        """Drop LSAs at max age (except origins in keep); returns the origins dropped."""
        gone = [o for o in self.lsas if o not in keep and self.age(o, now) >= self.max_age_s]
        for o in gone:
            lsa = self.lsas.pop(o)[0]
            self.digest ^= _lsa_hash(lsa.origin, lsa.seq)
        return gone

    def graph(self, cost: str) -> dict:
        """{u: {v: weight}} of the links both ends list."""
        listed = {o: {ln.nbr: ln for ln in lsa.links} for o, (lsa, _) in self.lsas.items()}
        g: dict = {}
        for u, links in listed.items():
            for v, ln in links.items():
                if v != u and u in listed.get(v, {}):
                    g.setdefault(u, {})[v] = link_weight(cost, ln.delay_us, ln.loss)
        return g
