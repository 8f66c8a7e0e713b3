"""The user-space tunnel's wire format (golden datagrams), the kernel tunnels' `ip`
arguments and overheads, and the daemon's argument checks. No root needed."""

from __future__ import annotations

import struct

import pytest

from testbed.capabilities import Capabilities
from testbed.kernel import tunnel as ktunnel
from testbed.tunnel import KINDS, availability, overhead
from testbed.tunnel import daemon as d

# An ICMP echo request 172.30.0.1 -> 172.30.0.2, 32 bytes of "x" (checksums included).
ECHO = bytes.fromhex(
    "4500003c0001000040012281ac1e0001ac1e0002"  # IPv4, total length 60, TTL 64, ICMP
    "08005e4312340001" + "78" * 32)
# An IPv6 packet: 40-byte header, payload length 8 (a UDP header), next header 17.
V6 = bytes.fromhex("6000000000081140" + "00" * 15 + "01" + "00" * 15 + "02" + "1f401f4000080000")
# virtio_net_hdr: TCPv4 GSO, partial checksum, hdr_len 66, gso_size 1420, csum 34+16.
GSO_HDR = struct.pack("<BBHHHH", 1, 1, 66, 1420, 34, 16)


def classify(data: bytes, offload: bool = True) -> int:
    buf = b"\0" * 10 + data  # the daemon receives at offset 10
    return d.classify(buf, 10, len(data), offload)


def test_golden_packets_are_plain():
    assert len(ECHO) == 60 and ECHO[0] == 0x45
    assert classify(ECHO) == d.PLAIN
    assert classify(ECHO, offload=False) == d.PLAIN
    assert classify(V6) == d.PLAIN


@pytest.mark.parametrize("data", [
    b"",
    b"hello, not an IP packet",
    ECHO[:-1],                                    # truncated: total length says 60
    ECHO + b"\0",                                 # trailing garbage
    bytes([0x44]) + ECHO[1:],                     # IHL 4 < 5
    bytes([0x55]) + ECHO[1:],                     # version 5
    ECHO[:19],                                    # shorter than an IPv4 header
    V6[:-1],
    GSO_HDR,                                      # a header and nothing after it
    GSO_HDR + b"garbage that is not IP at all",
    bytes([8]) + GSO_HDR[1:] + ECHO,              # unknown flag 8
    GSO_HDR[:1] + bytes([2]) + GSO_HDR[2:] + ECHO,  # GSO type 2 does not exist
])
def test_malformed_datagrams_are_refused(data):
    assert classify(data) == d.MALFORMED


def test_offload_datagrams_only_when_this_end_takes_offloads():
    assert classify(GSO_HDR + ECHO) == d.OFFLOAD
    assert classify(GSO_HDR + V6) == d.OFFLOAD
    assert classify(GSO_HDR + ECHO, offload=False) == d.MALFORMED


def test_a_header_travels_only_when_the_receiver_has_work_to_do():
    assert not d.needs_header(b"\0" * 10)
    assert not d.needs_header(bytes([d.F_DATA_VALID]) + b"\0" * 9)  # checksum already right
    assert d.needs_header(bytes([d.F_NEEDS_CSUM]) + b"\0" * 9)
    assert d.needs_header(GSO_HDR)
    assert d.needs_header(b"\0\x04" + b"\0" * 8)  # TCPv6 GSO


def test_plain_and_offload_datagrams_cannot_be_confused():
    # a virtio_net_hdr starts with its flags (< 0x10); an IP packet with 0x4_ or 0x6_
    for flags in (0, d.F_NEEDS_CSUM, d.F_DATA_VALID, d.F_NEEDS_CSUM | d.F_DATA_VALID):
        assert flags >> 4 not in (4, 6)


def test_overheads():
    assert overhead("vxlan") == 50
    assert overhead("gre") == 24 and overhead("gre", key=5) == 28
    assert overhead("ipip") == 20
    assert overhead("udp") == d.OVERHEAD == 28
    with pytest.raises(Exception, match="unknown kernel tunnel kind"):
        ktunnel.overhead("l2tp")


def test_link_argv():
    assert ktunnel.link_argv("tv0", "vxlan", "10.0.0.1", "10.0.1.2", vni=7) == [
        "link", "add", "name", "tv0", "type", "vxlan", "id", "7", "dstport", "4789",
        "local", "10.0.0.1", "remote", "10.0.1.2", "ttl", "64"]
    assert ktunnel.link_argv("tg0", "gre", "10.0.0.1", "10.0.1.2", key=9)[-6:] == [
        "remote", "10.0.1.2", "ttl", "64", "key", "9"]
    assert ktunnel.link_argv("ti0", "ipip", "1.1.1.1", "2.2.2.2") == [
        "link", "add", "name", "ti0", "type", "ipip", "local", "1.1.1.1", "remote", "2.2.2.2",
        "ttl", "64"]


def test_availability_follows_the_probe():
    caps = Capabilities(kernel="x", links={"vxlan": True, "gre": False, "ipip": True}, tun=False)
    got = availability(caps)
    assert set(got) == set(KINDS)
    assert got["vxlan"] is None and got["ipip"] is None
    assert "gre" in got["gre"] and "testbed doctor" in got["gre"]
    assert "TUN" in got["udp"]


BASE = ["--dev", "tudp0", "--local", "10.0.0.1", "--remote", "10.0.1.2",
        "--inner", "172.30.0.1/30", "--mtu", "1472"]


def test_daemon_arguments():
    a = d.parse_args(BASE)
    assert a.port == a.remote_port == d.DEFAULT_PORT and a.offload
    assert str(a.inner) == "172.30.0.1/30"
    assert not d.parse_args(BASE + ["--no-offload"]).offload


@pytest.mark.parametrize("extra, message", [
    (["--mtu", "40"], "--mtu must be"),
    (["--dev", "much-too-long-name"], "--dev must be"),
    (["--inner", "172.30.0.1"], "prefix length"),
    (["--remote", "not-an-ip"], "not an IPv4 address"),
    (["--port", "0"], "port must be"),
    (["--gso-max", "100"], "--gso-max must be"),
])
def test_daemon_refuses_bad_arguments(extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        d.parse_args(BASE + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_golden_echo_checksums_are_valid():
    def fold(data: bytes) -> int:
        s = sum(struct.unpack(f"!{len(data) // 2}H", data))
        while s >> 16:
            s = (s >> 16) + (s & 0xFFFF)
        return s

    assert fold(ECHO[:20]) == 0xFFFF and fold(ECHO[20:]) == 0xFFFF


def test_relay_loop_both_ways_on_the_runtime_loop():
    """The relay (Tunnel.run on a runtime Loop) without root: a datagram socketpair stands
    in for the TUN device (one packet per read and write, as TUN does)."""
    import socket

    from testbed.daemon import Loop

    def udp() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        return s

    sock, peer, stranger = udp(), udp(), udp()
    sock.setblocking(False)
    tun, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tun.setblocking(False)
    args = d.parse_args(["--dev", "tudp0", "--local", "127.0.0.1", "--remote", "127.0.0.1",
                         "--port", str(sock.getsockname()[1]),
                         "--remote-port", str(peer.getsockname()[1]),
                         "--inner", "172.30.0.1/30", "--mtu", "1472", "--no-offload"])
    t = d.Tunnel(args)
    t.sock, t.tun = sock, tun.fileno()
    try:
        kernel.send(ECHO)                              # routed into the TUN: to the peer
        peer.sendto(ECHO, sock.getsockname())          # from the peer: into the TUN
        peer.sendto(b"not IP", sock.getsockname())     # malformed: dropped
        stranger.sendto(ECHO, sock.getsockname())      # not the peer: dropped
        loop = Loop()
        loop.after(0.3, lambda now: loop.stop())
        t.run(loop)
        loop.close()
        peer.settimeout(1)
        kernel.settimeout(1)
        assert peer.recv(2048) == ECHO
        assert kernel.recv(2048) == ECHO
        c = t.stats()
        assert (c["tun_rx_packets"], c["sent_packets"], c["udp_rx_packets"]) == (1, 1, 3)
        assert (c["tun_tx_packets"], c["dropped_malformed"], c["dropped_foreign"]) == (1, 1, 1)
        assert c["wakeups"] >= 1 and c["tun_tx_bytes"] == len(ECHO)
    finally:
        for s in (sock, peer, stranger, tun, kernel):
            s.close()


def test_control_answers_stats_and_refuses_the_rest():
    t = d.Tunnel(d.parse_args(BASE))
    assert t.handle_control(b'{"stats": true}')["tun_rx_packets"] == 0
    assert "unknown command" in t.handle_control(b'{"nope": 1}')["error"]
    assert "bad JSON" in t.handle_control(b"{")["error"]
