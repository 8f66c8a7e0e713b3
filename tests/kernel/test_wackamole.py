"""Wackamole-style VIP failover on real namespaces (testbed.failover), and keepalived.

The main test injects random failures (a server's interface down), recoveries and
partitions (the link between the two LAN switches down) and checks, while the cluster
changes, that no VIP is ever held twice among the servers that share a view in RUN (the
paper's Property 1: status files and kernel addresses sampled), and once stable, that
every connected component holds every VIP exactly once (kernel addresses) and that the
router's ARP table maps every VIP to the MAC of its owner in the router's component.
TESTBED_WACKAMOLE_EVENTS (default 20, up to 100) sets the number of events,
TESTBED_WACKAMOLE_SEED their seed.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time

import pytest

from testbed import poll
from testbed.daemon import read_key
from testbed.errors import SpecError
from testbed.failover import (Timeouts, keepalived, set_interface, start_wackamole, wire)
from testbed.kernel import netns as kns
from testbed.network import Network
from topologies import wackamole_lan

pytestmark = pytest.mark.kernel

FAST = Timeouts(fault_s=0.8, heartbeat_s=0.2, discovery_s=1.0)
EVENTS = max(1, min(100, int(os.environ.get("TESTBED_WACKAMOLE_EVENTS", "20"))))
SEED = int(os.environ.get("TESTBED_WACKAMOLE_SEED", "1"))
VIPS = wackamole_lan.vips(10)


def ping(node, ip: str) -> bool:
    return node.run(["ping", "-c", "1", "-W", "1", ip], check=False).returncode == 0


def ns_socket(node, *args) -> socket.socket:
    with kns.enter(node.ns):
        return socket.socket(*args)


def view_key(st: dict) -> tuple:
    v = st["view"]
    return (v["vid"], v["coord"], v["inc"])


def at_most_once_per_view(wk) -> int:
    """Property 1: among the servers that share a view and are in RUN, no VIP is ever on
    two servers' interfaces at once. The namespaces cannot be read at one instant, so the
    addresses are read twice, server by server in the same order, and a VIP counts as held
    only if both reads saw it: two servers counted as holding it then held it at one same
    moment (the first's hold spans both its reads, the second's both of its own, and those
    spans overlap), while a hand-over (release, then acquire) between the reads is never
    mistaken for a double owner. Statuses are read before and after; only servers whose
    view and states did not change in between count. Returns how many were checked."""
    before = wk.statuses()
    first = {s: set(wk.held(s)) for s in wk.servers}
    held = {s: sorted(first[s] & set(wk.held(s))) for s in wk.servers}
    after = wk.statuses()
    groups: dict = {}
    for s in wk.servers:
        a, b = before[s], after[s]
        if not (a and b and wk.alive(s)):
            continue
        sig = lambda st: (view_key(st), st["state"], st["vip_state"])  # noqa: E731
        if sig(a) != sig(b) or a["state"] != "run" or a["vip_state"] != "run":
            continue
        groups.setdefault(view_key(a), []).append(s)
    checked = 0
    for key, members in groups.items():
        seen: dict = {}
        for s in members:
            checked += 1
            for v in held[s]:
                assert v not in seen, (f"{v} held by {seen[v]} and {s}, both in RUN in view "
                                       f"{key}: {held}")
                seen[v] = s
    return checked


@pytest.fixture
def lan(root_state, run_id):
    """4 servers over two switches (s1, s3 on sw1 with the router; s2, s4 on sw2), a LAN
    client lc1 and a client c1 behind the router."""
    topo = wackamole_lan.build(servers=4, switches=2, lan_clients=1, clients=1, rate_mbit=0)
    with Network(topo, run_id=run_id()) as net:
        yield net
    root_state.assert_unchanged()


def test_random_failures_recoveries_and_partitions_keep_each_vip_owned_once(lan, wait_until):
    net = lan
    servers = wackamole_lan.server_names(4)
    side = {"s1": 1, "s3": 1, "s2": 2, "s4": 2}
    # garp_refresh_s: a heal that brings no member back (the far side's servers failed
    # while cut off) changes no view; only the periodic announcement then fixes r1's table
    wk = start_wackamole(net, servers, VIPS, timeouts=FAST, balance_s=0.5, mature_s=0.3,
                         garp_refresh_s=1.0)
    wk.wait_stable(15)
    router = net["r1"]
    for v in VIPS:  # the router resolves every VIP: entries the failovers must correct
        wait_until(lambda v=v: ping(router, v), timeout=5, what=f"r1 -> {v}")
    rng = random.Random(SEED)
    down: set = set()
    cut = False
    samples = 0
    kinds: dict = {}

    def components() -> tuple:
        up = [s for s in servers if s not in down]
        groups = ([[s for s in up if side[s] == 1], [s for s in up if side[s] == 2]]
                  if cut else [up])
        router_side = groups[0]
        return [g for g in groups if g] + [[s] for s in sorted(down)], router_side

    for _ in range(EVENTS):
        options = ["fail"] if len(down) < 3 else []
        options += ["recover", "recover"] if down else []
        options += ["heal"] if cut else ["partition"]
        kind = rng.choice(options)
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind == "fail":
            s = rng.choice([s for s in servers if s not in down])
            set_interface(net, s, False)
            down.add(s)
        elif kind == "recover":
            s = rng.choice(sorted(down))
            set_interface(net, s, True)
            down.discard(s)
        elif kind == "partition":
            net.link("sw1", "sw2").set(up=False)
            cut = True
        else:
            net.link("sw1", "sw2").set(up=True)
            cut = False
        groups, router_side = components()
        why = ""

        def sampled_until_stable(groups=groups) -> bool:  # sample while the cluster reacts
            nonlocal samples, why
            samples += at_most_once_per_view(wk) > 0
            ok, why = wk.stable(groups, balanced=True)  # balanced: no hand-over to come
            return ok

        try:
            poll.wait_until(sampled_until_stable, 20, "stable", interval=0.01)
        except poll.WaitTimeout:
            pytest.fail(f"after {kind} ({groups}): {why}")
        holders = wk.holders()
        for g in groups:  # exactly once per component, on the servers
            for v in VIPS:
                assert len([s for s in holders[v] if s in g]) == 1, (kind, g, v, holders)
        if router_side:  # and in the router's ARP table, for the router's component
            want = {v: next(s for s in holders[v] if s in router_side) for v in VIPS}
            got: dict = {}

            def arp_as_wanted(want=want) -> bool:
                nonlocal got
                got = wk.arp_owners("r1", "r1-eth0")
                return got == want

            try:
                poll.wait_until(arp_as_wanted, 3, "r1's ARP table", interval=0.02)
            except poll.WaitTimeout:
                pytest.fail(f"r1's ARP table after {kind}: "
                            f"{ {v: (got[v], want[v]) for v in VIPS if got[v] != want[v]} } "
                            f"(VIP: (r1's entry, owner)); {net['r1'].neighbours('r1-eth0')}")
    assert samples >= EVENTS  # the invariant was checked during every change
    assert kinds.get("fail", 0) and kinds.get("recover", 0) and kinds.get("partition", 0)
    for s in servers:
        st = wk.status(s)
        assert not st["drops"], st["drops"]  # nothing forged here: nothing dropped
        assert st["views_installed"] >= 2


def capture(node, ifname: str, port: int, stop: threading.Event, out: list) -> threading.Thread:
    """Collect the UDP payloads to port seen on node's interface until stop is set."""
    s = ns_socket(node, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind((ifname, 0))
    s.settimeout(0.1)

    def loop():
        while not stop.is_set():
            try:
                frame = s.recv(2048)
            except socket.timeout:
                continue
            except OSError:
                break
            if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
                continue
            ihl = (frame[14] & 0x0F) * 4
            dport = struct.unpack_from("!H", frame, 14 + ihl + 2)[0]
            if dport == port:
                out.append(frame[14 + ihl + 8:])
        s.close()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def test_forged_and_replayed_messages_are_ignored_and_counted(lan, wait_until):
    net = lan
    servers = ["s1", "s2", "s3"]
    wk = start_wackamole(net, servers, VIPS, timeouts=FAST, balance_s=0.5, mature_s=0.3)
    wk.wait_stable(15)
    # record a view change (s3 cut off and back) as the LAN client lc1 sees it
    captured: list = []
    stop = threading.Event()
    t = capture(net["lc1"], "lc1-eth0", wk.configs["s1"]["port"], stop, captured)
    set_interface(net, "s3", False)
    wk.wait_stable(10, groups=[["s1", "s2"], ["s3"]])
    set_interface(net, "s3", True)
    wk.wait_stable(10, balanced=True)
    key = read_key(wk.configs["s1"]["key_file"])  # hex, as every daemon's key file
    wait_until(lambda: any(wire.decode(key, d)[0].type == wire.INSTALL for d in list(captured)),
               timeout=5, what="a captured INSTALL")
    types: dict = {}
    for d in list(captured):
        t_ = wire.decode(key, d)[0].type
        types[t_] = types.get(t_, 0) + 1
    stop.set()
    t.join(5)
    assert types.get(wire.PROPOSE) and types.get(wire.HEARTBEAT), types
    before = {s: wk.status(s) for s in servers}
    holders = wk.holders()

    tx = ns_socket(net["lc1"], socket.AF_INET, socket.SOCK_DGRAM)
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    port = wk.configs["s1"]["port"]
    bcast = str(wk.subnet.broadcast_address)
    replays = list(captured)
    for d in replays:  # every recorded message again, authentic but old
        tx.sendto(d, (bcast, port))
    # forged: s2 "leaves" and a new view without s1 is proposed, signed with a wrong key
    inc = int(time.time() * 1e6)
    view = wire.View(10_000, 2, (2, 3), inc)
    forged = [wire.encode(b"not the cluster key, 32 bytes!!!", wire.Header(m.type, 2, inc,
                          i + 1, inc + 10), m)
              for i, m in enumerate([wire.Leave(view), wire.Propose(view)])]
    forged.append(forged[0][:-1] + bytes([forged[0][-1] ^ 1]))  # a tag off by one bit
    for d in forged:
        tx.sendto(d, (bcast, port))
    # right key, but a sender id that is not configured
    stranger = wire.encode(key, wire.Header(wire.LEAVE, 77, inc, 1, inc + 10),
                           wire.Leave(view))
    tx.sendto(stranger, (bcast, port))
    tx.close()

    def counted():
        out = {}
        for s in servers:
            d0, d1 = before[s]["drops"], (wk.status(s) or {}).get("drops", {})
            out[s] = {k: d1.get(k, 0) - d0.get(k, 0) for k in set(d0) | set(d1)}
        return out

    # a daemon ignores its own messages without counting them
    expect = {s: sum(wire.decode(key, d)[0].sender != wk.ids[s] for d in replays)
              for s in servers}

    def all_counted():
        c = counted()
        return all(c[s].get("bad_hmac", 0) == len(forged)
                   and c[s].get("replay", 0) + c[s].get("stale", 0)
                   + c[s].get("misdirected", 0) == expect[s]
                   and c[s].get("unknown_sender", 0) == 1 for s in servers)

    assert all(expect.values())
    wait_until(all_counted, timeout=5, what="every forged and replayed message counted")
    time.sleep(2 * FAST.fault_s)  # long enough for a forged LEAVE or PROPOSE to act
    ok, why = wk.stable()
    assert ok, why
    for s in servers:
        assert view_key(wk.status(s)) == view_key(before[s]), s  # no view change
    assert wk.holders() == holders


def test_a_voluntary_leave_moves_its_vips_at_once(lan):
    net = lan
    servers = ["s1", "s2", "s3"]
    wk = start_wackamole(net, servers, VIPS, timeouts=Timeouts(5, 2, 7), balance_s=0.5,
                         mature_s=0.3)  # the paper's default timeouts: a leave needs none
    wk.wait_stable(20, balanced=True)
    held = wk.held("s2")
    assert held
    t0 = time.monotonic()
    assert wk.leave("s2") == 0
    took = wk.wait_stable(2, groups=[["s1", "s3"]], interval=0.005)
    assert time.monotonic() - t0 < 0.5, took  # far below the 5 s fault-detection timeout
    assert wk.held("s2") == []
    assert all(wk.owner(v) in ("s1", "s3") for v in held)
    st = wk.status("s2")
    assert st["leaving"] and st["held"] == []
    # back: it starts immature, holds nothing, then gets its share from the balancer
    wk.start("s2")
    wk.wait_stable(20, balanced=True)
    assert 3 <= len(wk.held("s2")) <= 4


def test_arp_cache_sharing_updates_a_neighbour_that_never_asked(lan, wait_until):
    """Unicast-only gratuitous ARP: the new owner can only reach lc1 because the old owner
    shared lc1's MAC with the group (ARP-cache sharing)."""
    net = lan
    servers = ["s1", "s2", "s3"]
    wk = start_wackamole(net, servers, VIPS, timeouts=FAST, balance_s=0.5, mature_s=0.3,
                         garp="unicast", arp_share_s=0.2)
    wk.wait_stable(15, balanced=True)
    lc1, vip = net["lc1"], VIPS[0]
    old = wk.owner(vip)
    assert ping(lc1, vip)
    lc1_ip, lc1_mac = lc1.ip, lc1.mac("lc1-eth0")
    others = [s for s in servers if s != old]
    wait_until(lambda: all((wk.status(s) or {}).get("neighbours", {}).get(lc1_ip) == lc1_mac
                           for s in others), timeout=5, what="lc1's entry shared")

    def lc1_entry():
        return next((e["mac"] for e in lc1.neighbours("lc1-eth0") if e["ip"] == vip), None)

    assert lc1_entry() == wk.mac(old)
    set_interface(net, old, False)
    wk.wait_stable(10, groups=[others, [old]])
    new = next(s for s in others if vip in wk.held(s))
    # no traffic from lc1 in between: only a frame sent to its MAC can have changed this
    wait_until(lambda: lc1_entry() == wk.mac(new), timeout=2, what="lc1's entry updated")
    assert wk.status(new)["kernel"].get("garp_unicast", 0) > 0
    assert ping(lc1, vip)


def test_membership_alone_installs_views_and_handles_a_leave(lan):
    net = lan
    servers = ["s1", "s2", "s3", "s4"]
    wk = start_wackamole(net, servers, VIPS, timeouts=FAST, membership_only=True)
    wk.wait_stable(10)
    assert all(wk.held(s) == [] for s in servers)  # no VIP manager
    assert "vip_state" not in wk.status("s1")
    wk.leave("s1")
    wk.wait_stable(2, groups=[["s2", "s3", "s4"]])
    history = [wk.status(s)["history"] for s in ("s2", "s3", "s4")]
    assert history[0][-1] == history[1][-1] == history[2][-1]
    assert history[0][-1][2] == [2, 3, 4]


def test_bad_input_is_refused_before_anything_starts(lan):
    net = lan
    servers = ["s1", "s2"]
    before = {f for f in os.listdir(net.log_dir)} if os.path.isdir(net.log_dir) else set()
    for kwargs, msg in (
            ({"servers": ["s1", "nosuch"]}, "unknown node"),
            ({"servers": ["s1", "sw1"]}, "switch"),
            ({"vips": ["10.200.0.5"]}, "outside"),
            ({"vips": ["10.100.0.11"]}, "already the address of s1"),
            ({"vips": ["10.100.0.255"]}, "broadcast"),
            ({"vips": ["10.100.0.300"]}, "bad VIP"),
            ({"timeouts": {"fault_s": 1, "heartbeat_s": 2, "discovery_s": 3}}, "below"),
            ({"timeouts": {"fault_s": 0, "heartbeat_s": 0, "discovery_s": 0}}, "0.02-600"),
            ({"garp": "loud"}, "garp"),
            ({"port": 0}, "port")):
        args = {"servers": servers, "vips": VIPS, **kwargs}
        with pytest.raises(SpecError, match=msg) as e:
            start_wackamole(net, args.pop("servers"), args.pop("vips"), **args)
        assert "\n" not in str(e.value)
    with pytest.raises(SpecError, match="advert_int"):
        keepalived.start(net, servers, VIPS, advert_int=0.005)
    with pytest.raises(SpecError, match="outside"):
        keepalived.start(net, servers, ["192.168.1.1"])
    after = {f for f in os.listdir(net.log_dir)} if os.path.isdir(net.log_dir) else set()
    assert after == before  # no key, configuration or log written
    assert all(not net[s].procs for s in servers)


@pytest.mark.skipif(not keepalived.available(), reason="keepalived not installed (make setup)")
@pytest.mark.parametrize("unicast", [False, True], ids=["multicast", "unicast"])
def test_keepalived_starts_and_fails_over(lan, unicast, wait_until):
    net = lan
    servers = ["s1", "s2", "s3"]
    ka = keepalived.start(net, servers, VIPS[:3], advert_int=0.1, unicast=unicast)
    assert [ka.owner(v) for v in VIPS[:3]] == ["s1", "s2", "s3"]  # rotating priorities
    for s in servers:  # its files are in the run's log directory, nowhere else
        d = ka.dirs[s]
        assert d.startswith(net.log_dir)
        assert os.path.exists(os.path.join(d, "keepalived.conf"))
        assert os.path.exists(os.path.join(d, "vrrp.pid"))
    t0 = time.monotonic()
    set_interface(net, "s1", False)
    wait_until(lambda: ka.holders()[VIPS[0]] == ["s2"], timeout=3, what="s2 takes VIP 0")
    took = time.monotonic() - t0
    assert took < 3 * ka.opts.master_down_s(190), took
    set_interface(net, "s1", True)
    ka.wait_ready(10)  # s1 preempts its VIP back
    assert ka.owner(VIPS[0]) == "s1"
    ka.stop()
    assert all(ka.held(s) == [] for s in servers)  # keepalived removes its VIPs
