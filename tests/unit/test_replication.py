"""The storage replication agent's modes over localhost sockets (real TCP, no namespaces)."""

import threading

import pytest

from testbed.migration.replication import (Primary, Replica, ReplicationError, replica_stats,
                                           workload)

BS = 4096


@pytest.fixture
def replica(tmp_path):
    r = Replica(("127.0.0.1", 0), path=str(tmp_path / "disk.img")).start()
    yield r
    r.close()


def blk(i: int) -> bytes:
    return (i.to_bytes(8, "big") * (BS // 8))[:BS]


def test_sync_write_is_persisted_before_it_returns(replica, tmp_path):
    p = Primary(replica.addr, mode="sync")
    for i in range(20):
        p.write(i, blk(i))
        assert replica.stats()["last_seq"] == i + 1  # acked => persisted
        assert p.pending() == (0, 0)
    p.close()
    with open(tmp_path / "disk.img", "rb") as f:
        data = f.read()
    assert data[5 * BS:6 * BS] == blk(5)


def test_async_byte_bound_caps_pending(replica):
    # checkpoint every 0.3 s: nothing is shipped before, so the byte bound must hold writes
    p = Primary(replica.addr, mode="async", max_bytes=4 * BS, checkpoint_s=0.3)
    lats = [p.write(i, blk(i)) for i in range(4)]
    assert p.pending()[1] <= 4 * BS
    assert max(lats) < 0.1               # queued, not waited for
    lat5 = p.write(4, blk(4))            # would exceed the bound: waits for a checkpoint
    assert lat5 > 0.1
    assert p.pending()[1] <= 4 * BS
    p.close()
    assert replica.stats()["writes"] == 5


def test_async_time_bound(replica):
    p = Primary(replica.addr, mode="async", max_lag_s=0.05, checkpoint_s=0.4)
    p.write(0, blk(0))
    # the oldest pending write becomes older than 50 ms: the next write must wait for it
    threading.Event().wait(0.1)
    t = p.write(1, blk(1))
    assert t > 0.1
    p.close()


def test_async_to_sync_switch_drains(replica):
    p = Primary(replica.addr, mode="async", checkpoint_s=10.0)  # nothing ships on its own
    for i in range(50):
        p.write(i, blk(i))
    assert p.pending()[0] == 50
    sw = p.to_sync()
    assert sw["pending_writes"] == 50
    assert p.pending() == (0, 0)
    assert p.mode == "sync"
    assert replica.stats()["last_seq"] == 50
    p.write(50, blk(50))
    assert replica.stats()["last_seq"] == 51 and p.pending() == (0, 0)
    p.close()


def test_crash_loses_only_unshipped_writes(replica):
    p = Primary(replica.addr, mode="async", checkpoint_s=0.2)
    res = workload(p, writes=10_000, block_size=BS, rate=500, crash_at_s=0.5)
    c = res["crash"]
    assert c is not None and c["issued"] > 0
    st = replica_stats(replica.addr)
    assert st["last_seq"] >= c["acked"]               # everything acked survived
    assert c["lost_writes"] == c["issued"] - c["acked"]
    assert 0 < c["lost_writes"] < c["issued"]
    assert 0 < c["rpo_s"] <= 0.2 + 0.2                # at most about one interval


def test_bad_arguments(replica):
    with pytest.raises(ValueError):
        Primary(replica.addr, mode="semi")
    with pytest.raises(ValueError):
        Primary(replica.addr, mode="async", max_bytes=0)


def test_lost_replica_is_reported(tmp_path):
    r = Replica(("127.0.0.1", 0)).start()
    p = Primary(r.addr, mode="sync", timeout=3)
    p.write(0, blk(0))
    p.sock.shutdown(2)
    with pytest.raises(ReplicationError):
        for i in range(5):
            p.write(i, blk(i))
    r.close()
