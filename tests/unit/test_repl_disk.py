"""The replica log (testbed.replication.disk): records survive a reopen, a torn tail is
dropped, forced writes complete on the loop thread through the wake-up fd, and the
counters tell forced from asynchronous runs apart."""

import os
import threading

from testbed.daemon import Loop
from testbed.poll import wait_until
from testbed.replication.disk import HEAD, Disk, encode_record, read_records


def test_records_survive_reopen(tmp_path):
    path = str(tmp_path / "log")
    d = Disk(path, forced=False)
    for i in range(5):
        d.append(b"rec%d" % i, force=bool(i % 2))
    assert d.flush()
    d.close()
    d2 = Disk(path, forced=False)
    assert d2.records() == [b"rec%d" % i for i in range(5)]
    d2.close()


def test_torn_and_corrupt_tail_is_dropped(tmp_path):
    path = str(tmp_path / "log")
    good = encode_record(b"one") + encode_record(b"two")
    with open(path, "wb") as f:
        f.write(good + encode_record(b"three")[:-2])  # torn
    d = Disk(path, forced=False)
    assert d.records() == [b"one", b"two"]
    assert d.torn_bytes > 0
    assert os.path.getsize(path) == len(good)
    d.append(b"four", force=False)
    d.close()
    assert read_records(path)[0] == [b"one", b"two", b"four"]
    # a flipped byte in the last record's data: its checksum fails
    raw = bytearray(open(path, "rb").read())
    raw[-1] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    recs, off = read_records(path)
    assert recs == [b"one", b"two"] and off == len(good)
    # a length field past the end
    open(path, "ab").write(HEAD.pack(1000, 0))
    assert read_records(path)[0] == [b"one", b"two"]


def test_forced_done_runs_on_loop_thread_in_order(tmp_path):
    loop = Loop()
    d = Disk(str(tmp_path / "log"), forced=True, extra_latency_s=0.002, loop=loop)
    seen = []
    main = threading.get_ident()
    for i in range(3):
        d.append(b"x" * 10, force=True,
                 done=lambda i=i: seen.append((i, threading.get_ident() == main)))
    assert seen == []  # forced: not done yet
    wait_until(lambda: (loop.run_once(0.05), len(seen) == 3)[1], 5, "forced writes done")
    assert seen == [(0, True), (1, True), (2, True)]
    s = d.stats()
    assert s["forced_writes"] == 3 and s["force_requests"] == 3 and s["writes"] == 3
    assert s["bytes"] == 3 * (HEAD.size + 10)
    assert s["force_seconds"] >= 3 * 0.002
    d.close()
    loop.close()


def test_asynchronous_mode_counts_force_requests(tmp_path):
    d = Disk(str(tmp_path / "log"), forced=False, extra_latency_s=0.5)
    seen = []
    d.append(b"a", force=True, done=lambda: seen.append("a"))
    d.append(b"b", force=False, done=lambda: seen.append("b"))
    assert seen == ["a", "b"]  # done at once, no 0.5 s latency
    assert d.flush(5)
    s = d.stats()
    assert s["forced_writes"] == 0 and s["force_requests"] == 1 and s["writes"] == 2
    assert s["force_seconds"] == 0
    d.close()


def test_unwritable_path_is_one_line_error(tmp_path):
    import pytest

    from testbed.replication.disk import DiskError
    with pytest.raises(DiskError, match="cannot open log"):
        Disk(str(tmp_path / "nodir" / "log"))
