"""VLAN switching: access ports, trunks and runtime change-over, on either of two backends.

- ``802.1q``: one bridge per switch with ``vlan_filtering 1``; access ports are PVID +
  untagged members of their VLAN, trunk ports tagged members of each VLAN they carry.
- ``bridges``: for kernels without 802.1Q (these machines): one bridge per VLAN in the
  switch (``vbr<vid>``), access ports enslaved to their VLAN's bridge. A trunk becomes a
  routed point-to-point underlay (169.254.0.0/16, MTU raised to 1550) over which one VXLAN
  device per VLAN (VNI = VLAN id, one UDP port per trunk) joins that VLAN's bridges on both
  switches. Isolation is the same (a frame only ever reaches its VLAN's bridge), and so is
  the change-over: one netlink request moves a port.
"""

from __future__ import annotations

import ipaddress

NATIVE = "802.1q"
BRIDGES = "bridges"
BACKENDS = (NATIVE, BRIDGES)
VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
TRUNK_MTU = 1500 + VXLAN_OVERHEAD
VXLAN_PORT = 4789
UNDERLAY = ipaddress.ip_network("169.254.0.0/16")


def bridge_name(switch: str, vid: int, backend: str) -> str:
    """The bridge that carries VLAN vid inside the switch's namespace."""
    return switch if backend == NATIVE else f"vbr{vid}"


def create_lines(switch: str, ns: str, vids: tuple, backend: str) -> list:
    """`ip -batch` lines creating the switch's bridge(s) straight into its namespace."""
    common = "type bridge stp_state 0 forward_delay 0"
    if backend == NATIVE:
        # no default PVID: a port belongs to exactly the VLANs we give it
        return [f"link add name {switch} netns {ns} {common} vlan_filtering 1 "
                f"vlan_default_pvid 0"]
    return [f"link add name vbr{vid} netns {ns} {common}" for vid in vids]


def trunk_underlay(index: int) -> tuple:
    """(address of end a, address of end b) of the index-th trunk's underlay /30."""
    base = int(UNDERLAY.network_address) + 4 * index
    if base + 3 > int(UNDERLAY.broadcast_address):
        raise ValueError("too many trunks for 169.254.0.0/16")
    return (ipaddress.ip_interface(f"{ipaddress.ip_address(base + 1)}/30"),
            ipaddress.ip_interface(f"{ipaddress.ip_address(base + 2)}/30"))


def vxlan_name(index: int, vid: int) -> str:
    return f"vx{index}.{vid}"


def vxlan_lines(index: int, vids: tuple, local, remote, dev: str) -> list:
    """`ip -batch` lines (run in the switch's namespace) for one trunk end: one VXLAN per
    VLAN, enslaved to that VLAN's bridge and up."""
    out = []
    for vid in vids:
        name = vxlan_name(index, vid)
        out.append(f"link add {name} mtu 1500 type vxlan id {vid} local {local.ip} "
                   f"remote {remote.ip} dev {dev} dstport {VXLAN_PORT + index}")
        out.append(f"link set {name} master vbr{vid} up")
    return out


def native_port(ipr, idx: int, access_vid=None, trunk_vids=()) -> None:
    """Make a bridge port an access port of access_vid, or a trunk of trunk_vids."""
    if access_vid is not None:
        ipr.vlan_filter("add", index=idx, vlan_info={"vid": access_vid, "flags": 6})
    for vid in trunk_vids:
        ipr.vlan_filter("add", index=idx, vlan_info={"vid": vid, "flags": 0})


def move(ipr, idx: int, old: int, new: int, backend: str, bridges: dict) -> None:
    """Move an access port from VLAN old to VLAN new at runtime.

    802.1q: add the new VLAN as PVID first, then drop the old one (the port is never in no
    VLAN). bridges: one request re-enslaves the port to the new VLAN's bridge."""
    if backend == NATIVE:
        ipr.vlan_filter("add", index=idx, vlan_info={"vid": new, "flags": 6})
        ipr.vlan_filter("del", index=idx, vlan_info={"vid": old})
    else:
        ipr.link("set", index=idx, master=bridges[new])
