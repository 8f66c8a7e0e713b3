"""Live TCP session migration with TCP_REPAIR between namespaces (paper 001's testbed):
the stream keeps its 4-tuple, the user sees no FIN or RST, the received bytes hash to the
sent ones; corrupt or truncated images are refused and the original keeps serving; a path
that dies mid-transfer leaves the original serving; back-to-back migrations
(TESTBED_MIGRATIONS, default 5; the experiment runs 20). Needs root."""

import os
import threading

import pytest

from testbed.migration.controller import MigrationController, MigrationFailed
from testbed.network import Network
from topologies import gmpls_dr

pytestmark = [pytest.mark.kernel]

MIGRATIONS = int(os.environ.get("TESTBED_MIGRATIONS", "5"))


def _net(run_id):
    return Network(gmpls_dr.build(), run_id=run_id())


def _controller(net, **kw):
    params = dict(seconds=300, burst_s=2, image_mb=2, buffer_s=2)
    params.update(kw)
    mc = MigrationController(net, gmpls_dr, **params)
    mc.setup()
    mc.wait_offset(mc.status()["offset"] + 1)
    return mc


def _assert_intact(report, migrations):
    p = report["player"]
    assert report["migrations"] == migrations
    assert not p["reset"]
    assert report["contiguous"], [(s["start_offset"], s["end_offset"])
                                  for s in report["streamers"]]
    assert report["bytes_equal"], (report["sent_bytes"], p["bytes"])
    assert report["hash_equal"]
    assert report["fin_rst_before_close"] == [], report["fin_rst_before_close"]


def _serving(mc, wait_until):
    """The current streamer is unfrozen and its offset grows."""
    st = mc.status()
    assert not st["frozen"] and st["connected"] and not st["migrated"]
    wait_until(lambda: mc.status()["offset"] > st["offset"], timeout=10,
               what="the original streamer to send on")


def test_migration_keeps_the_session(run_id):
    with _net(run_id) as net:
        mc = _controller(net)
        steps = mc.migrate(bod=True)
        assert [s["step"] for s in steps] == list(range(1, 12))
        tup = steps[-1]
        report = mc.finish()
        _assert_intact(report, 1)
        player = report["player"]
        assert f"{tup['local'][0]}:{tup['local'][1]}" == player["peer"]
        assert f"{tup['remote'][0]}:{tup['remote'][1]}" == player["local"]
        assert report["streamers"][0]["migrated_out"]
        assert report["streamers"][1]["site"] == "backup"
        assert report["streamers"][1]["start_offset"] > 0


def test_corrupt_or_truncated_image_refused(run_id, wait_until):
    with _net(run_id) as net:
        mc = _controller(net)
        from testbed.errors import SpecError

        n = len(mc.streamers)
        with pytest.raises(SpecError, match="fault"):
            mc.migrate(fault="bogus")  # refused before anything is started or frozen
        assert len(mc.streamers) == n and not mc.status()["frozen"]
        for fault in ("corrupt", "truncate"):
            with pytest.raises(MigrationFailed, match="refused|checksum|truncated"):
                mc.migrate(bod=True, fault=fault)
            assert mc.site == "main"
            _serving(mc, wait_until)
            assert not net.link("main", "l2sw").is_up  # the BoD path was released
        mc.migrate(bod=True)  # and a good image still goes through
        report = mc.finish()
        _assert_intact(report, 1)
        assert report["player"]["stalls"] == []


def test_path_dies_mid_transfer(run_id, wait_until):
    with _net(run_id) as net:
        mc = _controller(net, image_mb=4, buffer_s=3)  # 3.2 s at 10 Mbit/s
        errors = []

        def go():
            try:
                mc.migrate(bod=False, timeout_s=2)
            except MigrationFailed as e:
                errors.append(e)

        t = threading.Thread(target=go)
        t.start()

        def transferring():
            out = net["backup"].run(["ss", "-Htni", "state", "established",
                                     f"sport = :{mc.mport}"]).stdout
            return "bytes_received" in out
        wait_until(transferring, timeout=20, what="the image transfer to start")
        pub = net.link("main", "backup")
        pub.set(up=False)
        t.join(60)
        assert not t.is_alive()
        assert errors, "the migration should have failed"
        assert mc.site == "main"
        _serving(mc, wait_until)
        pub.set(up=True)
        report = mc.finish()
        _assert_intact(report, 0)
        assert len(report["streamers"]) == 1


def test_back_to_back_migrations(run_id):
    with _net(run_id) as net:
        mc = _controller(net, image_mb=1)
        sites = []
        for _ in range(MIGRATIONS):
            mc.migrate(bod=True)
            sites.append(mc.site)
        assert sites[:2] == ["backup", "main"][:len(sites[:2])]
        report = mc.finish()
        _assert_intact(report, MIGRATIONS)
        assert report["player"]["stalls"] == []


def test_precopy_live_migration(run_id):
    """Paper 003's pre-copy over the 10 Mbit/s path: the image travels while the stream
    runs and the application dirties pages; only the last few pages and the TCP state are
    sent frozen, so the suspension is far below a stop-and-copy of the image (3.2 s)."""
    with _net(run_id) as net:
        mc = _controller(net, image_mb=4, dirty_mbps=0.2, buffer_s=3)
        steps = mc.migrate(bod=False, precopy=True, stop_bytes=64 << 10)
        rep = steps[-1]
        rounds = rep["rounds"]
        assert len(rounds) >= 2 and rounds[-1]["final"]
        assert rounds[1]["pages"] > 0  # pages written during the bulk copy were chased
        assert rounds[-1]["bytes"] < 4e6 / 10
        stop_and_copy_floor = 4e6 * 8 / 10e6
        assert rep["suspension_s"] < min(1.0, stop_and_copy_floor / 2), rep["suspension_s"]
        report = mc.finish()
        _assert_intact(report, 1)
        assert report["player"]["stalls"] == []
