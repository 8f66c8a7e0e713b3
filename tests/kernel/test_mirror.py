"""The mirror on real namespaces (topologies/dr_site.py): a sync over a shaped WAN sends
only the changed blocks and leaves mirror == source; a WAN cut mid-sync leaves the mirror
untouched and the next sync completes; the heartbeat skips a sync to an unreachable peer;
failover with gratuitous ARP moves the client to the DR site. Needs root."""

from __future__ import annotations

import os
import stat

import pytest

from testbed.mirror import control, volume, workload
from testbed.mirror.daemon import MirrorError
from testbed.network import Network
from testbed.process import log_matches
from topologies import dr_site

pytestmark = pytest.mark.kernel
MB = 1 << 20
RATE = 5


@pytest.fixture
def net(root_state, run_id):
    with Network(dr_site.build(wan_rate_mbit=RATE), run_id=run_id()) as n:
        yield n
    root_state.assert_unchanged()


def setup_mirror(net, size=8 * MB, idle_timeout=5.0):
    src = os.path.join(net.log_dir, "vol.img")
    mirror = os.path.join(net.log_dir, "dr-site", "vol.img")
    os.makedirs(os.path.dirname(mirror))
    workload.make_volume(src, size, seed=1)
    volume.snapshot(src, mirror)
    control.start_receiver(net["dr"], mirror, idle_timeout=idle_timeout)
    return src, mirror


def dr_state(net) -> str:
    import json
    import sys

    res = net["dr"].run([sys.executable, "-m", "testbed.mirror", "status", "--peer",
                         "127.0.0.1"], check=False)
    return json.loads(res.stdout)["state"] if res.returncode == 0 else "down"


def test_sync_over_shaped_wan_sends_only_changed_blocks(net):
    src, mirror = setup_mirror(net)
    changed = workload.change(src, 10, locality=0.5, seed=2)
    st = control.run_sync(net["prim"], src, dr_site.DR_IP)
    assert st["blocks_sent"] == len(changed) == 13
    assert st["data_bytes"] == 13 * volume.DEFAULT_BLOCK
    assert volume.volume_manifest(mirror) == volume.volume_manifest(src) == st["manifest"]
    # it went through the 5 Mbit/s HTB: no faster than the rate (plus one GSO burst), and
    # not much slower
    assert 0.8 * RATE < st["goodput_mbit"] < 1.15 * RATE, st
    # nothing changed since: the next sync sends nothing
    assert control.run_sync(net["prim"], src, dr_site.DR_IP)["blocks_sent"] == 0


def test_cut_mid_sync_leaves_mirror_and_next_sync_completes(net, wait_until):
    src, mirror = setup_mirror(net, size=16 * MB, idle_timeout=1.5)
    before = volume.volume_manifest(mirror)
    workload.change(src, 10, seed=3)  # 1.6 MiB: about 2.7 s at 5 Mbit/s
    p = net["prim"].start(control.sync_argv(src, dr_site.DR_IP, timeout=1.5), name="sync")
    p.wait_ready(log_matches(lambda: p, "heartbeat"), timeout=20)
    wait_until(lambda: dr_state(net) == "syncing", timeout=10, what="the sync to start")
    wan = net.link("dr", "sw1")
    wan.set(up=False)
    assert p.wait(30) == 1
    assert "sync aborted" in p.log() or "timed out" in p.log()
    wait_until(lambda: dr_state(net) == "idle", timeout=10, what="receiver to drop the session")
    assert volume.volume_manifest(mirror) == before
    assert not [n for n in os.listdir(os.path.dirname(mirror)) if "staging" in n]
    # while the WAN is down the heartbeat fails: the sync is skipped with an alert
    alerts = []
    ctl = control.Controller(net["prim"], src, dr_site.DR_IP, alert=alerts.append)
    assert ctl.cycle() is None and "ALERT" in alerts[0]
    assert volume.volume_manifest(mirror) == before
    wan.set(up=True)
    st = ctl.cycle()
    assert st is not None and st["blocks_sent"] > 0
    assert volume.volume_manifest(mirror) == volume.volume_manifest(src)


def test_failover_with_garp_moves_client(net, wait_until):
    src, mirror = setup_mirror(net, size=1 * MB)
    prim, dr, c1 = net["prim"], net["dr"], net["c1"]
    control.run_sync(prim, src, dr_site.DR_IP)  # a committed mirror is read-only
    control.add_vip(prim, dr_site.VIP, "prim-eth0")
    c1.run(["ping", "-c", "1", "-W", "2", dr_site.VIP])
    owner = {n["ip"]: n["mac"] for n in c1.neighbours("c1-eth0")}
    assert owner[dr_site.VIP] == prim.mac("prim-eth0")
    net.link("prim", "sw1").set(up=False)
    assert not stat.S_IMODE(os.stat(mirror).st_mode) & stat.S_IWUSR
    control.promote(dr)
    assert os.stat(mirror).st_mode & stat.S_IWUSR
    with pytest.raises(MirrorError, match="promoted"):
        control.run_sync(dr, src, "127.0.0.1")  # a promoted mirror takes no more syncs
    control.move_host(dr, dr_site.VIP, "dr-eth0", "garp")
    wait_until(lambda: any(n["ip"] == dr_site.VIP and n["mac"] == dr.mac("dr-eth0")
                           for n in c1.neighbours("c1-eth0")), timeout=1.0,
               what="the client's ARP entry to move to dr")
    out = c1.run(["ping", "-c", "1", "-W", "1", dr_site.VIP]).stdout
    assert "1 received" in out


def test_background_load_shares_the_wan(net, wait_until):
    src, mirror = setup_mirror(net)
    alone = control.run_sync(net["prim"], src, dr_site.DR_IP, mode="file")
    assert alone["blocks_sent"] == 0  # nothing changed yet: file mode sends no file either
    workload.change(src, 12, seed=5)
    procs = workload.background(net, "c1", "dr", [(0, 20, None)])
    wait_until(lambda: net["c1"].run(["ss", "-Htn", "state", "established", "dport = :5301"]
                                     ).stdout.strip(), timeout=10, what="the background flow")
    try:
        st = control.run_sync(net["prim"], src, dr_site.DR_IP)
    finally:
        for p in procs:
            p.stop()
    assert volume.volume_manifest(mirror) == volume.volume_manifest(src)
    # one competing TCP flow on the 5 Mbit/s WAN takes a good part of it
    assert st["goodput_mbit"] < 0.8 * RATE, st
