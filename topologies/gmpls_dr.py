"""Paper 001's disaster-recovery testbed: a user, an access gateway, main and backup sites.

    user --(VLAN 1)-- agw --(VLAN 1)-- main      main --public 10 Mbit/s-- backup
                       \\--(VLAN 2)-- backup     main --bod-- l2sw --bod-- backup

The access gateway (NAGW) is a VLAN switch: the user and the main site in VLAN 1, the
backup site in VLAN 2, so both sites can hold the service address SERVICE_IP (and the same
MAC) in the same subnet and the user reaches whichever VLAN its port is in (step 7 moves
it). The servers reach each other over a public_mbit public path and over a bandwidth-on-
demand path through a layer-2 switch l2sw whose two ports sit in parking VLANs 11 and 12
(nothing passes) until the controller configures the migration VLAN 10 (step 3) and brings
the path up at bod_mbit (step 2; the links are taken down once the network is up, see
testbed.migration.controller). The caller passes this module to MigrationController, which
reads SERVICE_IP, SERVICE_MAC, PUBLIC, BOD and the VLAN numbers from it.
"""

from testbed import SpecError, Topology

SERVICE_IP = "10.1.0.100/24"
SERVICE_MAC = "02:00:00:00:01:64"
USER_IP = "10.1.0.1/24"
PUBLIC = ("10.9.0.1/24", "10.9.0.2/24")  # main, backup
BOD = ("10.9.1.1/24", "10.9.1.2/24")
VLAN_MAIN, VLAN_BACKUP = 1, 2
VLAN_MIGRATION, PARK_MAIN, PARK_BACKUP = 10, 11, 12
SMOKE_PING = ("user", "main")  # the backup site sits in VLAN 2, apart from the user by design


def _rate(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 10000:
        raise SpecError(f"gmpls_dr: {what} must be a rate in Mbit/s in (0, 10000], "
                        f"got {value!r}")
    return float(value)


def build(public_mbit=10, bod_mbit=1000, access_mbit=100) -> Topology:
    """The testbed; rates in Mbit/s (the paper: 10 public, 1000 BoD)."""
    public_mbit = _rate(public_mbit, "public_mbit")
    bod_mbit = _rate(bod_mbit, "bod_mbit")
    access_mbit = _rate(access_mbit, "access_mbit")
    big = {"net.ipv4.tcp_rmem": "4096 131072 67108864",
           "net.ipv4.tcp_wmem": "4096 65536 67108864"}
    t = Topology("gmpls_dr", auto_routes=False)
    t.add_switch("agw", vlans=[VLAN_MAIN, VLAN_BACKUP])
    t.add_switch("l2sw", vlans=[VLAN_MIGRATION, PARK_MAIN, PARK_BACKUP])
    t.add_host("user")
    t.add_host("main", sysctls=big)
    t.add_host("backup", sysctls=big)
    t.add_link("user", "agw", vlan=VLAN_MAIN, ip_a=USER_IP, rate=access_mbit,
               intf_a="user-eth0")
    t.add_link("main", "agw", vlan=VLAN_MAIN, ip_a=SERVICE_IP, rate=access_mbit,
               intf_a="main-svc")
    t.add_link("backup", "agw", vlan=VLAN_BACKUP, rate=access_mbit, intf_a="backup-svc")
    t.add_link("main", "backup", ip_a=PUBLIC[0], ip_b=PUBLIC[1], rate=public_mbit,
               intf_a="main-pub", intf_b="backup-pub")
    t.add_link("main", "l2sw", vlan=PARK_MAIN, ip_a=BOD[0], rate=bod_mbit, intf_a="main-bod")
    t.add_link("backup", "l2sw", vlan=PARK_BACKUP, ip_a=BOD[1], rate=bod_mbit,
               intf_a="backup-bod")
    return t
