"""Tunnels on real namespaces: every kind this kernel has carries a TCP byte stream intact
across a routed path pe_a - r - pe_b, has the MTU that fits the underlay, and leaves nothing
behind when removed; bad input creates nothing. Kinds the kernel lacks are skipped with the
capability probe's reason. Needs root."""

from __future__ import annotations

import functools
import os
import socket
import struct
import sys

import pytest

from testbed import capabilities
from testbed.errors import CapabilityError, SpecError, TestbedError
from testbed.kernel import tunnel as ktunnel
from testbed.network import Network
from testbed.process import listening
from testbed.topology import Topology
from testbed.tunnel import AUTO_ORDER, KINDS, add_tunnel, availability, overhead, tunnels

pytestmark = pytest.mark.kernel

STREAM_BYTES = 8 << 20
MTU = {"vxlan": 1450, "gre": 1476, "ipip": 1480, "udp": 1472}  # over a 1500-byte underlay
PORT = 7100

# Receive one TCP connection on (addr, port), print the byte count and SHA-256 of all of it.
SINK = """
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    h.update(b); n += len(b)
print(n, h.hexdigest(), flush=True)
"""
# Send N pseudo-random bytes (seeded) to (addr, port); print the count and their SHA-256.
SOURCE = """
import hashlib, random, socket, sys
data = random.Random(int(sys.argv[4])).randbytes(int(sys.argv[3]))
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
c.sendall(data); c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
"""


# GRE and IPIP exist only on full kernels: those cases also run in the stock-kernel VM tier
KIND_PARAMS = [pytest.param(k, marks=pytest.mark.fullkernel) if k in ("gre", "ipip") else k
               for k in KINDS]


def routed() -> Topology:
    t = Topology("pe")
    t.add_router("pe_a")
    t.add_router("r")
    t.add_router("pe_b")
    t.add_link("pe_a", "r")
    t.add_link("r", "pe_b")
    return t


@functools.lru_cache(maxsize=None)
def reasons() -> dict:
    """kind -> why this kernel lacks it (None if it has it), from the capability probe."""
    return availability(capabilities.probe())


def have() -> list:
    return [k for k in KINDS if reasons()[k] is None]


def need(kind: str) -> None:
    if reasons()[kind]:
        pytest.skip(f"{kind}: {reasons()[kind]}")


@pytest.fixture
def net(root_state, run_id):
    with Network(routed(), run_id=run_id()) as n:
        yield n
    root_state.assert_unchanged()


def devices(net) -> dict:
    return {n: ktunnel.show(net[n].ns) for n in ("pe_a", "r", "pe_b")}


def ping(node, ip: str, size: int = 56, df: bool = False):
    argv = ["ping", "-c", "1", "-W", "1", "-s", str(size)] + (["-M", "do"] if df else []) + [ip]
    return node.run(argv, check=False)


def snmp_ip(node) -> dict:
    """The node's /proc/net/snmp Ip: counters (per namespace)."""
    lines = [ln.split() for ln in node.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
             if ln.startswith("Ip:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))


def stream(net, tn, nbytes: int = STREAM_BYTES, seed: int = 1) -> tuple:
    """Send nbytes through tn from pe_a to pe_b's inner address; (sent, received) as
    (count, sha256) pairs."""
    a, b = net["pe_a"], net["pe_b"]
    dst = tn.ip("pe_b")
    sink = b.start([sys.executable, "-c", SINK, dst, str(PORT)], name="sink",
                   ready=listening(b.ns, PORT))
    out = a.run([sys.executable, "-c", SOURCE, dst, str(PORT), str(nbytes), str(seed)],
                timeout=60)
    assert sink.wait(timeout=20) == 0, sink.log()
    sent = out.stdout.split()
    got = sink.log().split()
    return (int(sent[0]), sent[1]), (int(got[0]), got[1])


# each kind ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_each_kind_carries_tcp(net, kind, wait_until):
    need(kind)
    tn = add_tunnel(net, "pe_a", "pe_b", kind=kind)
    assert tn.kind == kind
    assert tunnels(net) == [tn]
    before = tn.stats()
    fwd = snmp_ip(net["r"])["ForwDatagrams"]
    sent, got = stream(net, tn)
    assert got == sent  # every byte, in order
    after = tn.stats()
    # the bytes crossed the tunnel devices (not some other path)
    assert after["pe_b"]["rx_bytes"] - before["pe_b"]["rx_bytes"] >= STREAM_BYTES
    assert after["pe_a"]["tx_bytes"] - before["pe_a"]["tx_bytes"] >= STREAM_BYTES
    # ... and the underlay: encapsulated, they were forwarded by r
    assert snmp_ip(net["r"])["ForwDatagrams"] - fwd >= STREAM_BYTES // 65536
    if kind == "udp":
        for end in ("pe_a", "pe_b"):
            s = after[end]
            assert s["dropped_foreign"] == s["dropped_malformed"] == 0, s
            assert s["tun_write_errors"] == 0, s
        assert after["pe_b"]["tun_tx_bytes"] >= STREAM_BYTES
        assert after["pe_a"]["sent_packets"] == after["pe_b"]["udp_rx_packets"]


@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_mtu_fits_the_underlay(net, kind):
    need(kind)
    tn = add_tunnel(net, "pe_a", "pe_b", kind=kind)
    assert tn.mtu == MTU[kind] == 1500 - overhead(kind)
    for node in ("pe_a", "pe_b"):
        (dev,) = [d for d in ktunnel.show(net[node].ns) if d["name"] == tn.name]
        assert dev["mtu"] == tn.mtu
        assert dev["addresses"] == [str(tn.inner[node])]
    a, b = net["pe_a"], net["pe_b"]
    assert ping(a, tn.ip("pe_b")).returncode == 0  # resolve neighbours first
    reasm = snmp_ip(b)["ReasmReqds"]
    full = tn.mtu - 28  # ICMP 8 + IPv4 20
    ok = ping(a, tn.ip("pe_b"), size=full, df=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "1 received" in ok.stdout
    # the full-size inner packet fit the underlay: nothing was fragmented on the way
    assert snmp_ip(b)["ReasmReqds"] == reasm
    over = ping(a, tn.ip("pe_b"), size=full + 1, df=True)
    assert over.returncode != 0
    assert f"mtu={tn.mtu}" in over.stdout + over.stderr, over.stdout + over.stderr


@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_removal_leaves_nothing(net, kind):
    need(kind)
    before = devices(net)
    procs_before = {n: list(net[n].procs) for n in ("pe_a", "pe_b")}
    tn = add_tunnel(net, "pe_a", "pe_b", kind=kind)
    assert ping(net["pe_a"], tn.ip("pe_b")).returncode == 0
    daemons = list(tn.procs.values())
    assert len(daemons) == (2 if kind == "udp" else 0)
    assert all(p.alive for p in daemons)
    tn.remove()
    assert devices(net) == before
    assert all(not p.alive for p in daemons)
    assert {n: list(net[n].procs) for n in ("pe_a", "pe_b")} == procs_before
    assert tunnels(net) == []
    assert ping(net["pe_a"], tn.ip("pe_b")).returncode != 0
    if kind == "udp":
        out = net["pe_b"].run(["ss", "-Hlun", f"sport = :{tn.port}"]).stdout
        assert out.strip() == ""
    tn.remove()  # twice is harmless


def test_auto_takes_the_least_overhead_kind_available(net):
    tn = add_tunnel(net, "pe_a", "pe_b")
    want = next(k for k in AUTO_ORDER if reasons()[k] is None)
    assert tn.kind == want
    assert ping(net["pe_a"], tn.ip("pe_b")).returncode == 0


def test_two_tunnels_side_by_side(net):
    """Two tunnels between the same nodes get distinct names, subnets, VNIs or ports."""
    kinds = [k for k in KINDS if reasons()[k] is None][:2]
    if len(kinds) < 2:
        kinds = kinds * 2
    t1 = add_tunnel(net, "pe_a", "pe_b", kind=kinds[0])
    t2 = add_tunnel(net, "pe_a", "pe_b", kind=kinds[1])
    assert t1.name != t2.name
    assert not t1.inner_a.network.overlaps(t2.inner_a.network)
    for t in (t1, t2):
        assert ping(net["pe_a"], t.ip("pe_b")).returncode == 0
    t1.remove()
    assert ping(net["pe_a"], t2.ip("pe_b")).returncode == 0
    assert tunnels(net) == [t2]


def test_network_teardown_takes_the_tunnels(root_state, run_id):
    with Network(routed(), run_id=run_id()) as n:
        kinds = [k for k in KINDS if reasons()[k] is None]
        made = [add_tunnel(n, "pe_a", "pe_b", kind=k) for k in kinds]
        daemons = [p for t in made for p in t.procs.values()]
    assert made and all(not p.alive for p in daemons)
    for t in made:
        t.remove()  # after teardown: a no-op
    root_state.assert_unchanged()


# the user-space tunnel drops what is not from its peer, or not an IP packet ---------------

def _raw_udp(node, src: str, sport: int, dst: str, dport: int, payload: bytes) -> None:
    """Send one UDP datagram from (src, sport) even if that port is bound (a raw socket)."""
    script = ("import socket, sys\n"
              "s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)\n"
              "s.bind((sys.argv[1], 0))\n"
              "s.sendto(bytes.fromhex(sys.argv[3]), (sys.argv[2], 0))\n")
    data = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    node.run([sys.executable, "-c", script, src, dst, data.hex()])


def test_udp_tunnel_drops_foreign_and_malformed(net, wait_until):
    need("udp")
    tn = add_tunnel(net, "pe_a", "pe_b", kind="udp")
    a, r, b = net["pe_a"], net["r"], net["pe_b"]
    assert ping(a, tn.ip("pe_b")).returncode == 0
    base = tn.stats()["pe_b"]
    # a well-formed ICMP echo for pe_b's inner address, but from r: not the peer
    echo = _icmp_echo(tn.ip("pe_a"), tn.ip("pe_b"))
    r_ip = r.ip_toward(b)
    _raw_udp(r, r_ip, tn.port, tn.underlay["pe_b"], tn.port, echo)
    # from the peer's address and port, but not an IP packet / a truncated one
    peer = (a, tn.underlay["pe_a"], tn.port, tn.underlay["pe_b"], tn.port)
    _raw_udp(*peer, b"hello, not an IP packet")
    _raw_udp(*peer, echo[:-4])
    s = wait_until(lambda: (lambda s: s if s["dropped_malformed"] - base["dropped_malformed"]
                            >= 2 else None)(tn.stats()["pe_b"]), timeout=5,
                   what="the malformed datagrams to be counted")
    assert s["dropped_foreign"] - base["dropped_foreign"] == 1
    assert s["dropped_malformed"] - base["dropped_malformed"] == 2
    assert s["tun_tx_packets"] == base["tun_tx_packets"]  # none reached the TUN device
    # while the peer's real traffic still flows
    assert ping(a, tn.ip("pe_b")).returncode == 0
    assert tn.stats()["pe_b"]["tun_tx_packets"] == base["tun_tx_packets"] + 1


def _icmp_echo(src: str, dst: str) -> bytes:
    def csum(data: bytes) -> int:
        data += b"\0" * (len(data) % 2)
        s = sum(struct.unpack(f"!{len(data) // 2}H", data))
        s = (s >> 16) + (s & 0xFFFF)
        s += s >> 16
        return ~s & 0xFFFF

    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x1234, 1) + b"x" * 32
    icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    return hdr + icmp


# bad input: a one-line error, nothing created ---------------------------------------------

BAD = [
    (dict(b="nowhere"), SpecError, r"unknown node 'nowhere'"),
    (dict(a="nowhere"), SpecError, r"unknown node 'nowhere'"),
    (dict(b="pe_a"), SpecError, r"two different nodes"),
    (dict(kind="l2tp"), SpecError, r"kind must be one of"),
    (dict(inner_a="10.0.0.9/30", inner_b="10.0.0.10/30"), SpecError, r"overlaps 10\.0\.0\.0/24"),
    (dict(inner_a="192.168.7.1/30", inner_b="192.168.8.2/30"), SpecError, r"not in one subnet"),
    (dict(inner_a="192.168.7.1/30", inner_b="192.168.7.1/30"), SpecError, r"both ends"),
    (dict(inner_a="192.168.7.1/30"), SpecError, r"both inner_a and inner_b"),
    (dict(inner_a="192.168.7.1", inner_b="192.168.7.2"), SpecError, r"prefix length"),
    (dict(inner_a="192.168.7.0/30", inner_b="192.168.7.1/30"), SpecError, r"network or broad"),
    (dict(underlay_a="10.9.9.9"), SpecError, r"not an address of pe_a"),
    (dict(kind="vxlan", mtu=1451), SpecError, r"mtu must be .*68\.\.1450"),
    (dict(kind="vxlan", vni=0), SpecError, r"vni must be"),
    (dict(kind="udp", vni=7), SpecError, r"vni= is for vxlan"),
    (dict(kind="vxlan", key=7), SpecError, r"key= is for gre"),
    (dict(kind="udp", port=70000), SpecError, r"port must be"),
    (dict(name="a-name-too-long-for-linux"), SpecError, r"1\.\.15 characters"),
]


def _snapshot(net) -> tuple:
    return (devices(net), {n: list(net[n].procs) for n in net.nodes}, list(tunnels(net)),
            sorted(os.listdir(net.log_dir)))


@pytest.mark.parametrize("kw, exc, pattern", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_input_creates_nothing(net, kw, exc, pattern):
    if kw.get("kind") in KINDS:
        need(kw["kind"])
    args = {"a": "pe_a", "b": "pe_b", **kw}
    before = _snapshot(net)
    with pytest.raises(exc, match=pattern) as e:
        add_tunnel(net, **args)
    assert "\n" not in str(e.value)
    assert _snapshot(net) == before


def test_a_kind_the_kernel_lacks_names_doctor(net):
    missing = [k for k in KINDS if reasons()[k]]
    if not missing:
        pytest.skip("this kernel has every tunnel kind")
    before = _snapshot(net)
    with pytest.raises(CapabilityError, match=r"testbed doctor") as e:
        add_tunnel(net, "pe_a", "pe_b", kind=missing[0])
    assert missing[0] in str(e.value)
    assert _snapshot(net) == before


def test_clashes_with_an_existing_tunnel(net):
    kind = next(k for k in KINDS if reasons()[k] is None)
    t1 = add_tunnel(net, "pe_a", "pe_b", kind=kind, inner_a="192.168.50.1/30",
                    inner_b="192.168.50.2/30")
    before = _snapshot(net)
    with pytest.raises(SpecError, match=r"overlaps 192\.168\.50\.0/30 \(tunnel"):
        add_tunnel(net, "pe_a", "pe_b", kind=kind, inner_a="192.168.50.5/29",
                   inner_b="192.168.50.6/29")
    with pytest.raises(SpecError, match=rf"already has an interface {t1.name}"):
        add_tunnel(net, "pe_a", "pe_b", kind=kind, name=t1.name)
    assert _snapshot(net) == before
    assert ping(net["pe_a"], t1.ip("pe_b")).returncode == 0  # the first one is untouched


def test_failure_half_way_removes_the_first_end_udp(net):
    """pe_b's daemon cannot bind its port (someone holds it): pe_a's end is undone."""
    need("udp")
    b = net["pe_b"]
    holder = b.start([sys.executable, "-c", "import socket, sys, time\n"
                      "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                      "s.bind((sys.argv[1], 4790)); time.sleep(60)", b.ip_toward(net["pe_a"])],
                     name="holder", ready=listening(b.ns, 4790, "udp"))
    before = devices(net)
    procs = {n: list(net[n].procs) for n in net.nodes}
    with pytest.raises(TestbedError, match=r"Address already in use"):
        add_tunnel(net, "pe_a", "pe_b", kind="udp", port=4790)
    assert devices(net) == before
    assert {n: list(net[n].procs) for n in net.nodes} == procs
    assert tunnels(net) == []
    holder.stop()
    assert net["pe_a"].run(["ss", "-Hlun", "sport = :4790"]).stdout.strip() == ""


def test_failure_half_way_removes_the_first_end_vxlan(net):
    """pe_b already has a foreign VXLAN device with the VNI: pe_a's end is deleted again."""
    need("vxlan")
    b = net["pe_b"]
    b.run(["ip", "link", "add", "foreign", "type", "vxlan", "id", "4242", "dstport", "4789",
           "local", b.ip_toward(net["pe_a"])])
    before = devices(net)
    with pytest.raises(TestbedError, match=r"(?i)vxlan|exists"):
        add_tunnel(net, "pe_a", "pe_b", kind="vxlan", vni=4242)
    assert devices(net) == before
    assert not [d for d in devices(net)["pe_a"] if d["kind"] == "vxlan"]
    assert tunnels(net) == []


def test_unreachable_underlay_is_refused(net):
    """A route removed on pe_a: the tunnel is refused before anything is made."""
    kind = next(k for k in KINDS if reasons()[k] is None)
    a = net["pe_a"]
    via = [d for d, gw in a.routes() if gw]
    assert via
    for d in via:
        a.del_route(d)
    before = _snapshot(net)
    with pytest.raises(TestbedError, match=r"pe_a (has no route|cannot reach)"):
        add_tunnel(net, "pe_a", "pe_b", kind=kind)
    assert _snapshot(net) == before
